#!/usr/bin/env bash
# How the node agent's cost grows with the cluster: a real kube-apiserver (scripts/kube-apiserver.sh) holding
# OTHER_PODS pods on NODES other nodes, OWN_PODS pods on the agent's node, GATEWAYS gateway pods, NAMESPACES
# namespaces and a policy; the agent (release build) watches it from a network namespace. Printed: time to the
# first complete view and the first reconcile, the agent's resident memory (VmRSS and peak VmHWM), what each
# watch holds, the API requests the agent made in a 30 s steady state by verb, and — for comparison — the size
# of one `kubectl get namespaces,pods -A -o yaml`, which the earlier kubectl-sidecar integration fetched every
# 2 s on every node.
#
#   scripts/agent-scale.sh                       # 100,000 other pods on 5,000 nodes (several minutes)
#   OTHER_PODS=0 scripts/agent-scale.sh          # the same agent in an empty cluster, for the difference
#
# Root (network namespace, the agent's netlink). Cleans up its namespace, processes and files on exit.
set -euo pipefail

OTHER_PODS=${OTHER_PODS:-100000}
NODES=${NODES:-5000}
OWN_PODS=${OWN_PODS:-30}
GATEWAYS=${GATEWAYS:-6}
NAMESPACES=${NAMESPACES:-200}
PARALLEL=${PARALLEL:-4}
STEADY_SECONDS=${STEADY_SECONDS:-30}

cd "$(dirname "$0")/.."
ME=agent-scale.sh
log() { echo "$ME: $*" >&2; }

[[ $(id -u) == 0 ]] || { log "needs root (a network namespace and netlink)"; exit 1; }
BIN=target/release/egress-gateway
[[ -x $BIN ]] || cargo build --release -p gateway
eval "$(scripts/kube-apiserver.sh env)"
[[ -x $KUBECTL ]] || scripts/kube-apiserver.sh build

NS=egscale$$
DIR=$(mktemp -d /tmp/agent-scale.XXXXXX)
AGENT_PID=""
cleanup() {
  [[ -n $AGENT_PID ]] && kill "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" 2>/dev/null || true
  scripts/kube-apiserver.sh stop "$DIR/kube" >/dev/null 2>&1 || true
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT

ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" link add u0 type veth peer name u1
ip -n "$NS" addr add 172.18.0.2/16 dev u0
ip -n "$NS" link set u0 up
ip -n "$NS" link set u1 up
in_ns() { ip netns exec "$NS" "$@"; }
in_ns scripts/kube-apiserver.sh start "$DIR/kube" >/dev/null
K() { in_ns "$KUBECTL" --kubeconfig "$DIR/kube/kubeconfig" "$@"; }
K apply -f deploy/crds/egressgatewaypolicies.yaml >/dev/null
K wait --for=condition=Established crd/egressgatewaypolicies.projectcalico.org >/dev/null

# --- the cluster
python3 - "$DIR" "$OTHER_PODS" "$NODES" "$OWN_PODS" "$GATEWAYS" "$NAMESPACES" "$PARALLEL" <<'EOF'
import json, sys
d, other, nodes, own, gws, nss, parallel = sys.argv[1], *map(int, sys.argv[2:])
def pod(ns, name, node, labels, ip=None):
    p = {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": name, "namespace": ns, "labels": labels},
         "spec": {"nodeName": node, "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}]}}
    return p
namespaces = [{"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": f"ns{i}", "labels": {"team": f"t{i % 10}"},
                            "annotations": {"egress.projectcalico.org/egressGatewayPolicy": "red"}}}
              for i in range(nss)] + [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "egress"}}]
json.dump({"apiVersion": "v1", "kind": "List", "items": namespaces}, open(f"{d}/namespaces.json", "w"))
policy = {"apiVersion": "projectcalico.org/v3", "kind": "EgressGatewayPolicy", "metadata": {"name": "red"},
          "spec": {"rules": [{"destination": {"cidr": "10.0.0.0/8"}},
                             {"gateway": {"selector": "egress-code == 'red'",
                                          "namespaceSelector": "projectcalico.org/name == 'egress'"}}]}}
json.dump(policy, open(f"{d}/policy.json", "w"))
mine = [pod(f"ns{i % nss}", f"own-{i}", "node-a", {"app": "web"}) for i in range(own)]
mine += [pod("egress", f"gw-{i}", f"gw-node-{i}", {"egress-code": "red", "egress-gateway/gateway": "true"})
         for i in range(gws)]
json.dump({"apiVersion": "v1", "kind": "List", "items": mine}, open(f"{d}/mine.json", "w"))
status = [{"ns": p["metadata"]["namespace"], "name": p["metadata"]["name"],
           "ip": f"10.244.{200 + i // 250}.{1 + i % 250}" if not p["metadata"]["name"].startswith("gw-")
                 else f"172.18.1.{1 + i}"} for i, p in enumerate(mine)]
json.dump(status, open(f"{d}/status.json", "w"))
others = [pod(f"ns{i % nss}", f"p-{i}", f"node-{1 + i % nodes}", {"app": f"a{i % 50}"}) for i in range(other)]
chunk = (len(others) + parallel - 1) // max(parallel, 1) if others else 0
for k in range(parallel):
    part = others[k * chunk:(k + 1) * chunk] if chunk else []
    json.dump({"apiVersion": "v1", "kind": "List", "items": part}, open(f"{d}/others-{k}.json", "w"))
EOF
K create -f "$DIR/namespaces.json" >/dev/null
K create -f "$DIR/policy.json" >/dev/null
K create -f "$DIR/mine.json" >/dev/null
python3 - "$DIR/status.json" <<'EOF' >"$DIR/status.sh"
import json, sys
for s in json.load(open(sys.argv[1])):
    patch = json.dumps({"status": {"phase": "Running", "podIP": s["ip"], "podIPs": [{"ip": s["ip"]}]}})
    print(f"K patch pod -n {s['ns']} {s['name']} --subresource=status --type=merge -p '{patch}' >/dev/null")
EOF
# shellcheck disable=SC1090
source "$DIR/status.sh"
if ((OTHER_PODS > 0)); then
  log "creating $OTHER_PODS pods on $NODES other nodes ($PARALLEL kubectl processes)..."
  t0=$(date +%s)
  pids=()
  for ((k = 0; k < PARALLEL; k++)); do
    K create -f "$DIR/others-$k.json" >/dev/null &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  log "created in $(($(date +%s) - t0)) s"
fi
total=$(K get pods -A --no-headers 2>/dev/null | wc -l)
dump_bytes=$(K get namespaces,pods -A -o yaml | wc -c)

# --- the agent
cat >"$DIR/node.yaml" <<EOF
node_name: node-a
underlay_ip: 172.18.0.2
cluster_cidrs: [10.244.0.0/16, 10.96.0.0/12]
kubernetes: { kubeconfig: $DIR/kube/kubeconfig }
health: { port: 8080, interval: 1s, timeout: 100ms }
listen: 127.0.0.1:9101
EOF
api_requests() {
  K get --raw /metrics | awk '/^apiserver_request_total\{/ && /resource="(pods|namespaces|egressgatewaypolicies)"/ {
      match($0, /verb="[A-Z]+"/); v = substr($0, RSTART + 6, RLENGTH - 7); n[v] += $NF }
    END { for (v in n) printf "%s=%d ", v, n[v] }
    /^apiserver_longrunning_requests\{/ && /verb="WATCH"/ && /resource="(pods|namespaces|egressgatewaypolicies)"/ { w += $NF }
    END { printf "open WATCHes=%d\n", w }'
}
before=$(api_requests)
start_ns=$(date +%s%N)
# `ip netns exec` execs the agent: $! is the agent's own pid (not a subshell's), for /proc/PID/status.
ip netns exec "$NS" "$BIN" node --config "$DIR/node.yaml" >"$DIR/agent.log" 2>&1 &
AGENT_PID=$!
until in_ns curl -fsS -o /dev/null 127.0.0.1:9101/readiness 2>/dev/null; do
  kill -0 "$AGENT_PID" 2>/dev/null || { log "the agent exited:"; tail -20 "$DIR/agent.log" >&2; exit 1; }
  sleep 0.05
done
ready_ms=$((($(date +%s%N) - start_ns) / 1000000))
synced=$(grep -o 'every watch has listed.*' "$DIR/agent.log" | sed 's/\x1b\[[0-9;]*m//g' | head -1)
after_sync=$(api_requests)
sleep "$STEADY_SECONDS"
steady=$(api_requests)
objects=$(in_ns curl -fsS 127.0.0.1:9101/metrics | grep '^egress_node_cluster_objects' | sed 's/egress_node_cluster_objects{watch="\([a-z_]*\)"} /\1=/' | tr '\n' ' ')
rss=$(awk '/VmRSS/ {print $2}' "/proc/$AGENT_PID/status")
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$AGENT_PID/status")
pods=$(in_ns curl -fsS 127.0.0.1:9101/metrics | awk '/^egress_node_pods / {print $2}')

echo "cluster: $total pods ($OTHER_PODS on $NODES other nodes, $OWN_PODS on this node, $GATEWAYS gateways), $((NAMESPACES + 1)) namespaces + system ones"
echo "agent: ready ${ready_ms} ms after start; $synced"
echo "agent: watches hold $objects; opted-in pods programmed: $pods"
echo "agent: VmRSS $((rss / 1024)) MiB, peak VmHWM $((hwm / 1024)) MiB"
echo "API requests (pods, namespaces, policies; all clients) before the agent: $before"
echo "                                                      after its sync: $after_sync"
echo "                                           after ${STEADY_SECONDS} s of steady state: $steady"
echo "for comparison: one \`kubectl get namespaces,pods -A -o yaml\` is $((dump_bytes / 1024)) KiB (the kubectl sidecar fetched that every 2 s on every node)"
