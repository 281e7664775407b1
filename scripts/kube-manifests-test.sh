#!/usr/bin/env bash
# deploy/ against a real Kubernetes API server: kube-apiserver + etcd on loopback from scripts/kube-apiserver.sh
# (no nodes, no controllers: objects are stored and validated, nothing runs). Checks, in order:
#
#   1. the third-party kinds that deploy/ uses (ServiceMonitor, NetworkAttachmentDefinition) get minimal TEST
#      STAND-IN CRDs from tests/fixtures/kube/third-party-crds.yaml: their specs are not validated here;
#   2. `kubectl apply -k deploy/ --validate=strict` succeeds in full and every object it renders is on the server;
#   3. the EgressGatewayPolicy CRD (deploy/crds/) is Established: projectcalico.org/v3, cluster-scoped;
#   4. deploy/policies/red-blue.yaml and tests/fixtures/kube/valid-policies.yaml are accepted; `kubectl get
#      egressgatewaypolicies` shows the printer columns; what the server stores passes `egress-gateway check`;
#   5. the node agents' service account may get/list/watch EgressGatewayPolicies and not write them (RBAC);
#   6. every tests/fixtures/kube/invalid-policies/*.yaml is REJECTED by the server, with a message containing each of
#      the file's `# expect:` lines, and is not stored; `egress-gateway check` rejects it too (unless the file says
#      `# egress-gateway check: accepts`).
#
# Prints PASS / FAIL per check and a summary; exits 1 if anything failed, 77 (skipped) when the API server cannot be
# built here (no Go and nothing cached). Everything it starts is stopped and its temp dir removed, also on failure.
# The `egress-gateway check` parts use target/{release,debug}/egress-gateway, built if missing (as
# scripts/validate-manifests.sh does); without cargo they say SKIPPED.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/skip.sh
source scripts/skip.sh

ME=kube-manifests-test
started=$SECONDS
passed=0
failed=0
failures=()

step() { printf '\n==> %s\n' "$*"; }
indent() { sed 's/^/      /'; }
pass() {
  passed=$((passed + 1))
  printf 'PASS  %s\n' "$1"
}
# fail WHAT [DETAIL]
fail() {
  failed=$((failed + 1))
  failures+=("$1")
  printf 'FAIL  %s\n' "$1"
  if [[ -n ${2:-} ]]; then printf '%s\n' "$2" | indent; fi
}
# expect WHAT WANT GOT
expect() {
  if [[ $3 == "$2" ]]; then pass "$1: $3"; else fail "$1" "expected: $2"$'\n'"got:      $3"; fi
}

# --- tools ------------------------------------------------------------------------------------------------------
eval "$(scripts/kube-apiserver.sh env)" # KUBE_BIN, KUBECTL
if [[ ! -x $KUBE_BIN/kube-apiserver ]] && ! command -v go >/dev/null 2>&1; then
  skipped "$ME" "no kube-apiserver in $KUBE_BIN and no Go to build it (scripts/kube-apiserver.sh build)"
  exit "$SKIP_STATUS"
fi
bin=""
for b in target/release/egress-gateway target/debug/egress-gateway; do
  if [[ -x $b ]]; then bin=$b; break; fi
done
if [[ -z $bin ]] && command -v cargo >/dev/null 2>&1; then
  echo "==> cargo build -p gateway (for egress-gateway check)"
  cargo build -q --release -p gateway --locked
  bin=target/release/egress-gateway
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/$ME.XXXXXX")
cleanup() {
  local rc=$?
  if [[ $rc != 0 && $rc != "$SKIP_STATUS" && -f $work/api/kube-apiserver.log ]]; then
    echo "$ME: last lines of kube-apiserver.log:" >&2
    tail -n 15 "$work/api/kube-apiserver.log" >&2 || true
  fi
  if [[ -d $work/api ]]; then scripts/kube-apiserver.sh stop "$work/api" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

k() { "$KUBECTL" "$@"; }

# wait_served RESOURCE: until the API server lists RESOURCE (a CRD is in discovery a moment after Established).
wait_served() {
  for _ in $(seq 1 60); do
    if k get "$1" -A -o name >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  return 1
}

# --- 0. the API server ------------------------------------------------------------------------------------------
step "kube-apiserver and etcd on loopback (scripts/kube-apiserver.sh start $work/api)"
KUBECONFIG=$(scripts/kube-apiserver.sh start "$work/api")
export KUBECONFIG
export KUBECACHEDIR=$work/kube-cache # kubectl's discovery cache: not in ~/.kube
k version | indent

# --- 1. stand-ins for third-party CRDs --------------------------------------------------------------------------
step "third-party CRDs: TEST STAND-INS from tests/fixtures/kube/third-party-crds.yaml"
cat <<'EOF' | indent
NOTE: ServiceMonitor (prometheus-operator) and NetworkAttachmentDefinition (Multus) are not ours; a real cluster
gets their CRDs from those projects. These stand-ins have the real names, group, version and scope but minimal
schemas, so the ServiceMonitors and NetworkAttachmentDefinitions in deploy/ are stored, NOT validated.
EOF
if out=$(k apply -f tests/fixtures/kube/third-party-crds.yaml 2>&1 &&
  k wait --for condition=Established --timeout=60s -f tests/fixtures/kube/third-party-crds.yaml 2>&1) &&
  wait_served servicemonitors.monitoring.coreos.com &&
  wait_served network-attachment-definitions.k8s.cni.cncf.io; then
  pass "stand-in CRDs servicemonitors.monitoring.coreos.com, network-attachment-definitions.k8s.cni.cncf.io established"
else
  fail "stand-in CRDs" "$out"
fi

# --- 2. kubectl apply -k deploy/ --------------------------------------------------------------------------------
step "kubectl apply -k deploy/ --validate=strict"
k kustomize deploy/ >"$work/rendered.yaml"
rendered=$(grep -c '^kind: ' "$work/rendered.yaml")
if out=$(k apply -k deploy/ --validate=strict 2>&1); then
  printf '%s\n' "$out" | indent
  pass "kubectl apply -k deploy/ ($rendered objects rendered)"
else
  printf '%s\n' "$out" | indent
  fail "kubectl apply -k deploy/ (exit status non-zero; output above)"
fi
if stored=$(k get -f "$work/rendered.yaml" -o name 2>&1); then
  expect "objects of deploy/ on the server" "$rendered" "$(grep -c . <<<"$stored")"
else
  fail "objects of deploy/ on the server" "$stored"
fi

# --- 3. the CRD -------------------------------------------------------------------------------------------------
step "CustomResourceDefinition egressgatewaypolicies.projectcalico.org"
crd=crd/egressgatewaypolicies.projectcalico.org
if out=$(k wait --for condition=Established --timeout=60s "$crd" 2>&1) && wait_served egressgatewaypolicies.projectcalico.org
then
  pass "$crd Established and served"
else
  fail "$crd Established" "$out"
fi
expect "CRD group, scope, kind, plural, versions" \
  "projectcalico.org Cluster EgressGatewayPolicy egressgatewaypolicies v3 served=true storage=true" \
  "$(k get "$crd" -o jsonpath='{.spec.group} {.spec.scope} {.spec.names.kind} {.spec.names.plural} {.spec.versions[*].name} served={.spec.versions[0].served} storage={.spec.versions[0].storage}' 2>&1)"

# --- 4. valid policies ------------------------------------------------------------------------------------------
step "valid EgressGatewayPolicies"
for f in deploy/policies/red-blue.yaml tests/fixtures/kube/valid-policies.yaml; do
  if out=$(k apply --validate=strict -f "$f" 2>&1); then
    printf '%s\n' "$out" | indent
    pass "accepted: $f"
  else
    fail "accepted: $f" "$out"
  fi
done
table=$(k get egressgatewaypolicies 2>&1) || true
printf '%s\n' "\$ kubectl get egressgatewaypolicies" "$table" | indent
expect "printer columns" "NAME AGE" "$(awk 'NR == 1 {$1 = $1; print}' <<<"$table")"
expect "policies listed" "red-blue valid-calico-sample valid-edges valid-empty-destination" \
  "$(awk 'NR > 1 {print $1}' <<<"$table" | sort | tr '\n' ' ' | sed 's/ $//')"
wide=$(k get egressgatewaypolicies -o wide 2>&1) || true
printf '%s\n' "\$ kubectl get egressgatewaypolicies -o wide" "$wide" | indent
expect "-o wide columns" "NAME FIRST-DESTINATION AGE" "$(awk 'NR == 1 {$1 = $1; print}' <<<"$wide")"
expect "red-blue's first destination" "192.0.2.0/24" "$(awk '$1 == "red-blue" {print $2}' <<<"$wide")"
# Calico's default for gatewayPreference, applied by the server (structural schema defaulting).
expect "red-blue gatewayPreference (defaulted)" "None None None" \
  "$(k get egressgatewaypolicy red-blue -o jsonpath='{.spec.rules[*].gatewayPreference}' 2>&1)"
k get egressgatewaypolicies -o yaml >"$work/stored-policies.yaml"
if [[ -n $bin ]]; then
  # What the node agents' kubectl sidecar dumps (daemonset.yaml), defaults included, must read back.
  if out=$("$bin" check "$work/stored-policies.yaml" 2>&1); then
    pass "$bin check on the stored policies (kubectl get -o yaml): ${out##*: }"
  else
    fail "$bin check on the stored policies (kubectl get -o yaml)" "$out"
  fi
else
  skipped "$ME: egress-gateway check of the stored policies" "no egress-gateway binary and no cargo to build it"
fi

# --- 5. RBAC ----------------------------------------------------------------------------------------------------
step "RBAC of the node agents (deploy/node-agent/rbac.yaml)"
sa=system:serviceaccount:egress:egress-node-agent
for verb in get list watch create delete; do
  want=yes
  [[ $verb == get || $verb == list || $verb == watch ]] || want=no
  # (stdout only: for a cluster-scoped resource kubectl warns on stderr that it ignores the namespace)
  expect "$sa may $verb egressgatewaypolicies" "$want" \
    "$(k auth can-i "$verb" egressgatewaypolicies.projectcalico.org --as="$sa" 2>"$work/can-i.err" || true)"
done
# Pods: the watches, and patch for the gateway maintenance annotations; nothing else is written.
for verb in get list watch patch create delete; do
  want=yes
  [[ $verb == create || $verb == delete ]] && want=no
  expect "$sa may $verb pods" "$want" "$(k auth can-i "$verb" pods --all-namespaces --as="$sa" 2>/dev/null || true)"
done
for verb in get list watch patch; do
  want=yes
  [[ $verb == patch ]] && want=no
  expect "$sa may $verb namespaces" "$want" "$(k auth can-i "$verb" namespaces --as="$sa" 2>/dev/null || true)"
done

# --- 6. invalid policies ----------------------------------------------------------------------------------------
step "invalid EgressGatewayPolicies (tests/fixtures/kube/invalid-policies/): each must be rejected"
shopt -s nullglob
invalid=(tests/fixtures/kube/invalid-policies/*.yaml)
shopt -u nullglob
[[ ${#invalid[@]} -gt 0 ]] || fail "no files in tests/fixtures/kube/invalid-policies/"
for f in "${invalid[@]}"; do
  case=$(basename "$f" .yaml)
  name=$(sed -n 's/^  name: *//p' "$f" | head -n 1)
  mapfile -t expects < <(sed -n 's/^# expect: //p' "$f")
  if [[ ${#expects[@]} == 0 || -z $name ]]; then
    fail "$case: the file needs metadata.name and at least one '# expect:' line"
    continue
  fi
  if out=$(k apply --validate=strict -f "$f" 2>&1); then
    fail "$case: ACCEPTED by the server" "$out"
    k delete --ignore-not-found -f "$f" >/dev/null 2>&1 || true
    continue
  fi
  missing=()
  for e in "${expects[@]}"; do
    grep -qF -e "$e" <<<"$out" || missing+=("$e")
  done
  if k get egressgatewaypolicy "$name" >/dev/null 2>&1; then
    fail "$case: rejected, but stored anyway" "$out"
  elif [[ ${#missing[@]} -gt 0 ]]; then
    fail "$case: rejected, but the message lacks: ${missing[*]}" "$out"
  else
    pass "$case: rejected"
    printf '%s\n' "$out" | indent
  fi
  if [[ -n $bin ]]; then
    if grep -q '^# egress-gateway check: accepts' "$f"; then want=0; else want=1; fi
    got=0
    "$bin" check "$f" >"$work/check.out" 2>&1 || got=1
    if [[ $got == "$want" ]]; then
      pass "$case: egress-gateway check $([[ $want == 1 ]] && echo rejects || echo accepts) it too"
    else
      fail "$case: egress-gateway check exit status $got, expected $want" "$(cat "$work/check.out")"
    fi
  fi
done
if [[ -z $bin ]]; then
  skipped "$ME: egress-gateway check of the invalid policies" "no egress-gateway binary and no cargo to build it"
fi
expect "invalid policies stored" "none" "$(k get egressgatewaypolicies -o name | grep '/invalid-' || echo none)"

# --- summary ----------------------------------------------------------------------------------------------------
server=$(k version -o json 2>/dev/null | sed -n 's/^ *"gitVersion": "\(v1[^"]*\)".*/\1/p' | tail -n 1)
echo
if [[ $failed -gt 0 ]]; then
  echo "$ME: FAIL: $passed passed, $failed failed (kube-apiserver $server, $((SECONDS - started)) s):"
  printf '  %s\n' "${failures[@]}"
  exit 1
fi
echo "$ME: PASS: $passed passed, 0 failed (kube-apiserver $server, $((SECONDS - started)) s)"
