#!/usr/bin/env bash
# How the node agent's cost and speed hold up in a large cluster. A real kube-apiserver (scripts/kube-apiserver.sh)
# holds OTHER_PODS pods on NODES other nodes (created in bulk, PARALLEL kubectl processes), OWN_PODS pods on the
# agent's node, GATEWAYS gateway pods, NAMESPACES namespaces and POLICIES EgressGatewayPolicies; the agent (release
# build) watches it from a network namespace. Namespace nsI uses policy pol(I mod POLICIES) and own pod I is in
# ns(I mod NAMESPACES), so every policy has pods on the agent's node; gateway K is labelled egress-code=c(K mod
# POLICIES) and policy polP selects cP. The gateways are objects without processes: a UDP responder speaking the
# probe protocol (gateway/src/probe.rs) answers "ready" for every gateway IP from a second network namespace, so the
# agent's probes find them healthy — and it keeps answering after a gateway's pod is deleted, so only the watch can
# take a next hop out. Measured, in this order:
#
#  1. ready: time to the first complete view and the first reconcile;
#  2. steady state (STEADY_SECONDS): the API requests by verb (apiserver_request_total for pods, namespaces and
#     policies, every client — the agent is the only one then; a WATCH counts when it ends), the agent's VmRSS at
#     its start and end;
#  3. podIP → ip rule, from a netlink listener in the agent's namespace (RTMGRP_IPV4_RULE, stamped on receipt),
#     counted from the issue of the status subresource's merge PATCH (one persistent HTTPS connection; also from
#     its response), one pod at a time, in namespace egscale-latency (policy pol0): first LATENCY_PODS pods each
#     created, addressed, timed and deleted in turn, so the node holds OWN_PODS + 1 pods; then LATENCY_PODS pods
#     created without an address and addressed one after another, so the node grows to OWN_PODS + LATENCY_PODS
#     pods; these are then deleted (one deletecollection) and their rules go;
#  4. policy edit → tables: pol0's gateway selector alternates between c0 and c1 (POLICY_EDITS times); the time
#     until the default route of every table of pol0's pods has the new next hops;
#  5. gateway deleted → next hop gone: gw-0 (a pol0 gateway) is deleted with gracePeriodSeconds=0 and recreated,
#     GATEWAY_DELETES times; the time until every table of pol0's pods has lost (and regained) its next hop;
#  6. the agent's peak memory (VmHWM) and the duration of its kernel writes (its log), then one summary block with
#     every figure, the sizes and each phase's wall time. For comparison it also prints the size of one `kubectl
#     get namespaces,pods -A -o yaml`, which the earlier kubectl-sidecar integration fetched every 2 s on every node.
#
#   scripts/agent-scale.sh               # 100,000 other pods on 5,000 nodes, 1,000 namespaces, 20 gateways,
#                                        # 10 policies, 40 own pods, 2 x 1,000 latency pods, 300 s steady state:
#                                        # about 17 minutes on 2 cores: 6 creating the pods, 2 listing them, 5 idle
#   OTHER_PODS=2000 NODES=100 NAMESPACES=100 LATENCY_PODS=200 STEADY_SECONDS=20 scripts/agent-scale.sh  # ~1 min
#   OTHER_PODS=0 scripts/agent-scale.sh  # the same agent in an otherwise empty cluster, for the difference
#
# Environment (defaults): OTHER_PODS (100000), NODES (5000), OWN_PODS (40), GATEWAYS (20), NAMESPACES (1000),
# POLICIES (10), LATENCY_PODS (1000), POLICY_EDITS (10), GATEWAY_DELETES (5), STEADY_SECONDS (300), PARALLEL (4).
# Needs GATEWAYS >= POLICIES >= 2 and NAMESPACES, OWN_PODS >= POLICIES.
#
# Root (network namespaces, the agent's netlink). Cleans up its namespaces, processes and files on every exit.
set -euo pipefail

OTHER_PODS=${OTHER_PODS:-100000}
NODES=${NODES:-5000}
OWN_PODS=${OWN_PODS:-40}
GATEWAYS=${GATEWAYS:-20}
NAMESPACES=${NAMESPACES:-1000}
POLICIES=${POLICIES:-10}
LATENCY_PODS=${LATENCY_PODS:-1000}
POLICY_EDITS=${POLICY_EDITS:-10}
GATEWAY_DELETES=${GATEWAY_DELETES:-5}
PARALLEL=${PARALLEL:-4}
STEADY_SECONDS=${STEADY_SECONDS:-300}

cd "$(dirname "$0")/.."
ME=agent-scale.sh
log() { echo "$ME: $*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "needs root (network namespaces and netlink)"
((POLICIES >= 2 && GATEWAYS >= POLICIES)) || die "needs GATEWAYS >= POLICIES >= 2 (have $GATEWAYS, $POLICIES)"
((NAMESPACES >= POLICIES && OWN_PODS >= POLICIES)) || die "needs NAMESPACES and OWN_PODS >= POLICIES"
((OWN_PODS <= 10000 && LATENCY_PODS <= 12500 && GATEWAYS <= 10000)) || die "too many own, latency or gateway pods"
BIN=target/release/egress-gateway
[[ -x $BIN ]] || cargo build --release -p gateway
eval "$(scripts/kube-apiserver.sh env)"
[[ -x $KUBECTL ]] || scripts/kube-apiserver.sh build

NS=egscale$$      # the agent's node (and the API server, on its loopback)
GWNS=egscalegw$$  # the gateways' addresses and their probe responder
DIR=$(mktemp -d /tmp/agent-scale.XXXXXX)
AGENT_PID=""
RESPONDER_PID=""
MEASURE_PID=""
BG_PIDS=() # kubectl creates, the steady state's sleep
cleanup() {
  local rc=$? p
  if [[ $rc != 0 ]]; then
    log "failed (exit $rc) in phase: ${phase_name:-}"
    if [[ -f $DIR/agent.log ]]; then
      log "last lines of the agent's log:"
      tail -n 20 "$DIR/agent.log" >&2 || true
    fi
  fi
  for p in "$MEASURE_PID" "$AGENT_PID" "$RESPONDER_PID" "${BG_PIDS[@]}"; do
    [[ -n $p ]] || continue
    kill "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  scripts/kube-apiserver.sh stop "$DIR/kube" >/dev/null 2>&1 || true
  ip netns del "$NS" 2>/dev/null || true
  ip netns del "$GWNS" 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP # so that a signal runs the EXIT trap too

# Wall time per phase, for the summary.
PHASES=""
phase_began=0
phase() {
  local now
  now=$(date +%s%N)
  [[ -z ${phase_name:-} ]] || PHASES+="$phase_name $(((now - phase_began) / 1000000)) ms"$'\n'
  phase_name=${1:-}
  phase_began=$now
  [[ -z $phase_name ]] || log "phase: $phase_name"
}

phase "API server start"
ip netns add "$NS"
ip netns add "$GWNS"
ip -n "$NS" link set lo up
ip -n "$NS" link add u0 type veth peer name u1 netns "$GWNS"
ip -n "$NS" addr add 172.18.0.2/16 dev u0
ip -n "$NS" link set u0 up
ip -n "$GWNS" link set lo up
ip -n "$GWNS" link set u1 up
in_ns() { ip netns exec "$NS" "$@"; }
in_ns scripts/kube-apiserver.sh start "$DIR/kube" >/dev/null
K() { in_ns "$KUBECTL" --kubeconfig "$DIR/kube/kubeconfig" "$@"; }
K apply -f deploy/crds/egressgatewaypolicies.yaml >/dev/null
K wait --for=condition=Established crd/egressgatewaypolicies.projectcalico.org >/dev/null

# --- a small API client, the gateways' probe responder and the measurements (python3, standard library only)
cat >"$DIR/scale.py" <<'EOF'
"""agent-scale.sh's helpers: `status PLAN`, `responder PORT IP...`, `measure PLAN OUT`."""
import base64, errno, http.client, json, re, selectors, socket, ssl, struct, sys, threading, time
import urllib.request


def say(*a):
    print("agent-scale.sh:", *a, file=sys.stderr, flush=True)


class Api:
    """One persistent HTTPS connection to the API server of a kubeconfig (bearer token, CA data)."""

    def __init__(self, kubeconfig):
        text = open(kubeconfig).read()
        server = re.search(r"server: https://([^\s]+)", text).group(1)
        self.host, self.port = server.rsplit(":", 1)
        ca = base64.b64decode(re.search(r"certificate-authority-data: (\S+)", text).group(1)).decode()
        self.token = re.search(r"token: (\S+)", text).group(1)
        self.ctx = ssl.create_default_context(cadata=ca)
        self.conn = None

    def connect(self):
        self.conn = http.client.HTTPSConnection(self.host, int(self.port), context=self.ctx, timeout=60)
        self.conn.connect()
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def call(self, method, path, body=None, ctype="application/json", ok=(200, 201, 202)):
        """(issued, returned, status, json): monotonic times of the request's send and its response."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": "Bearer " + self.token, "Accept": "application/json",
                   "User-Agent": "agent-scale.sh"}
        if data is not None:
            headers["Content-Type"] = ctype
        for attempt in (0, 1):
            try:
                if self.conn is None:
                    self.connect()
                issued = time.monotonic()
                self.conn.request(method, path, data, headers)
                resp = self.conn.getresponse()
                text = resp.read()
                returned = time.monotonic()
                break
            except (http.client.HTTPException, OSError):
                self.conn = None
                if attempt:
                    raise
        if resp.status not in ok:
            raise RuntimeError(f"{method} {path}: HTTP {resp.status}: {text[:300]!r}")
        return issued, returned, resp.status, json.loads(text) if text else None

    def pod_status(self, ns, name, ip):
        patch = {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}
        return self.call("PATCH", f"/api/v1/namespaces/{ns}/pods/{name}/status", patch,
                         "application/merge-patch+json")


# ------------------------------------------------------------------------------------------ netlink

RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE, RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 24, 25, 26, 32, 33, 34
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTMGRP_IPV4_ROUTE, RTMGRP_IPV4_RULE = 0x40, 0x80
RTN_UNICAST, RTN_UNREACHABLE = 1, 7
SO_RCVBUFFORCE = 33


def attrs(data, off):
    out = {}
    while off + 4 <= len(data):
        ln, typ = struct.unpack_from("=HH", data, off)
        if ln < 4:
            break
        out[typ & 0x3FFF] = data[off + 4:off + ln]
        off += (ln + 3) & ~3
    return out


def u32(b):
    return struct.unpack("=I", b[:4])[0]


class Kernel:
    """The agent namespace's IPv4 rules and routes as netlink reports them: a dump, then every change, each
    stamped with time.monotonic() when its datagram was read (a thread that does nothing else)."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
        self.sock.bind((0, RTMGRP_IPV4_ROUTE | RTMGRP_IPV4_RULE))
        self.cond = threading.Condition()
        self.rules = {}        # source address -> table
        self.rule_added = {}   # source address -> when its rule appeared
        self.routes = {}       # (table, "dst/len") -> (type, frozenset of gateways)
        self.waiter = None     # [predicate, time it first held]
        self.overflows = 0
        self.seq = 0
        self.dump()
        threading.Thread(target=self.run, daemon=True).start()

    def dump(self):
        for typ in (RTM_GETRULE, RTM_GETROUTE):
            self.seq += 1
            body = struct.pack("=BBBBBBBBI", socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)
            self.sock.send(struct.pack("=IHHII", 16 + len(body), typ, 0x301, self.seq, 0) + body)
            while not self.parse(self.sock.recv(1 << 20), time.monotonic()):
                pass

    def run(self):
        while True:
            try:
                buf = self.sock.recv(1 << 20)
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                with self.cond:  # changes were lost: read the whole state again
                    self.overflows += 1
                    self.rules.clear()
                    self.routes.clear()
                    self.dump()
                    self.check(time.monotonic())
                continue
            t = time.monotonic()
            with self.cond:
                self.parse(buf, t)
                self.check(t)

    def check(self, t):
        if self.waiter and self.waiter[1] is None and self.waiter[0](self):
            self.waiter[1] = t
        self.cond.notify_all()

    def parse(self, buf, t):
        off, done = 0, False
        while off + 16 <= len(buf):
            ln, typ, _flags, seq, _pid = struct.unpack_from("=IHHII", buf, off)
            if ln < 16:
                break
            body = buf[off + 16:off + ln]
            if typ == NLMSG_DONE and seq == self.seq:
                done = True
            elif typ == NLMSG_ERROR and struct.unpack_from("=i", body)[0] != 0:
                raise OSError(-struct.unpack_from("=i", body)[0], "netlink dump")
            elif typ in (RTM_NEWRULE, RTM_DELRULE):
                self.rule(typ == RTM_NEWRULE, body, t)
            elif typ in (RTM_NEWROUTE, RTM_DELROUTE):
                self.route(typ == RTM_NEWROUTE, body, t)
            off += (ln + 3) & ~3
        return done

    def rule(self, added, body, t):
        family, _dst_len, src_len, _tos, table = struct.unpack_from("=BBBBB", body)
        a = attrs(body, 12)
        if family != socket.AF_INET or src_len != 32 or 2 not in a:  # FRA_SRC
            return
        src = socket.inet_ntoa(a[2])
        if added:
            self.rules[src] = u32(a[15]) if 15 in a else table  # FRA_TABLE
            self.rule_added.setdefault(src, t)
        else:
            self.rules.pop(src, None)
            self.rule_added.pop(src, None)

    def route(self, added, body, t):
        family, dst_len, _src_len, _tos, table, _proto, _scope, kind = struct.unpack_from("=BBBBBBBB", body)
        if family != socket.AF_INET:
            return
        a = attrs(body, 12)
        table = u32(a[15]) if 15 in a else table  # RTA_TABLE
        dst = (socket.inet_ntoa(a[1]) if 1 in a else "0.0.0.0") + f"/{dst_len}"  # RTA_DST
        if not added:
            self.routes.pop((table, dst), None)
            return
        gateways = set()
        if 5 in a:  # RTA_GATEWAY
            gateways.add(socket.inet_ntoa(a[5]))
        mp, off = a.get(9, b""), 0  # RTA_MULTIPATH: struct rtnexthop, then its attributes
        while off + 8 <= len(mp):
            ln = struct.unpack_from("=H", mp, off)[0]
            if ln < 8:
                break
            hop = attrs(mp[off:off + ln], 8)
            if 5 in hop:
                gateways.add(socket.inet_ntoa(hop[5]))
            off += (ln + 3) & ~3
        self.routes[(table, dst)] = (kind, frozenset(gateways))

    def default_route(self, src):
        table = self.rules.get(src)
        return None if table is None else self.routes.get((table, "0.0.0.0/0"))

    def timed(self, predicate, action, timeout=30.0):
        """Runs action() (which returns (issued, returned)) and waits until predicate(self) holds; returns
        (issued, returned, when it held) or None after timeout."""
        with self.cond:
            if predicate(self):
                raise RuntimeError("the expected state holds before the change")
            self.waiter = [predicate, None]
        issued, returned = action()
        with self.cond:
            self.cond.wait_for(lambda: self.waiter[1] is not None, timeout)
            held, self.waiter = self.waiter[1], None
        return None if held is None else (issued, returned, held)

    def wait(self, predicate, timeout=60.0):
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self), timeout)


# ------------------------------------------------------------------------------------------ commands

def cmd_status(plan_path):
    plan = json.load(open(plan_path))
    api = Api(plan["kubeconfig"])
    for p in plan["own"] + plan["gateways"]:
        api.pod_status(p["ns"], p["name"], p["ip"])


def cmd_responder(port, *ips):
    """Answers the node agent's UDP probes (gateway/src/probe.rs) with "ready", from each gateway IP."""
    sel = selectors.DefaultSelector()
    for ip in ips:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((ip, int(port)))
        sel.register(s, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            data, peer = key.fileobj.recvfrom(64)
            if len(data) == 16 and data[:8] == b"EGHP\x01\x00\x00\x00":
                key.fileobj.sendto(b"EGHP\x01\x01\x00\x00" + data[8:], peer)


def stats(values):
    """p50 p90 p99 max n, in ms (nearest-rank percentiles)."""
    if not values:
        return {"n": 0}
    v = sorted(values)
    rank = lambda q: v[min(len(v) - 1, max(0, -(-len(v) * q // 100) - 1))]
    return {"p50": rank(50) * 1e3, "p90": rank(90) * 1e3, "p99": rank(99) * 1e3, "max": v[-1] * 1e3, "n": len(v)}


def fmt(s):
    if not s.get("n"):
        return "n=0"
    return f"p50 {s['p50']:.1f} ms, p90 {s['p90']:.1f} ms, p99 {s['p99']:.1f} ms, max {s['max']:.1f} ms, n={s['n']}"


def agent_metric(prefix):
    text = urllib.request.urlopen("http://127.0.0.1:9101/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def cmd_measure(plan_path, out_path):
    plan = json.load(open(plan_path))
    api, kernel = Api(plan["kubeconfig"]), Kernel()
    out = open(out_path, "w")
    result = lambda key, value: (print(f"{key}={value}", file=out, flush=True), say(f"{key}: {value}"))
    gw_ip = {g["name"]: g["ip"] for g in plan["gateways"]}
    of_code = lambda c: frozenset(g["ip"] for g in plan["gateways"] if g["code"] == c)
    srcs = [p["ip"] for p in plan["own"] if p["policy"] == 0]  # pol0's pods on this node
    result("pol0_tables", len(srcs))

    def routes_are(gateways):
        want = (RTN_UNICAST, gateways) if gateways else (RTN_UNREACHABLE, frozenset())
        return lambda k: all(k.default_route(s) == want for s in srcs)

    if not kernel.wait(routes_are(of_code("c0")), 60):
        raise SystemExit(f"pol0's pods never routed via {sorted(of_code('c0'))}: "
                         f"{[kernel.default_route(s) for s in srcs]}")

    # --- podIP -> ip rule
    lat = plan["latency"]
    node_pods = lambda: agent_metric('egress_node_cluster_objects{watch="node_pods"}')
    pod_path = f"/api/v1/namespaces/{lat['ns']}/pods"

    def create(name):
        api.call("POST", pod_path, {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": lat["ns"]},
            "spec": {"nodeName": plan["node"],
                     "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}]}})

    def until(what, predicate, timeout=30.0, pause=0.005):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {what}")
            time.sleep(pause)

    def address(name, ip):
        """PATCHes the pod's status.podIP: (issued, returned, when its rule appeared or None after 10 s)."""
        issued, returned, _, _ = api.pod_status(lat["ns"], name, ip)
        with kernel.cond:
            kernel.cond.wait_for(lambda: ip in kernel.rule_added, 10)
            return issued, returned, kernel.rule_added.get(ip)

    def report(key, samples):
        seen = [(i, r, s) for i, r, s in samples if s is not None]
        result(f"{key}_from_issue", fmt(stats([s - i for i, _, s in seen])))
        result(f"{key}_from_return", fmt(stats([max(0.0, s - r) for _, r, s in seen])))
        result(f"{key}_patch_rtt", fmt(stats([r - i for i, r, _ in samples])))
        result(f"{key}_missing", len(samples) - len(seen))
        result(f"{key}_before_response", sum(s < r for _, r, s in seen))
        return [s - i for i, _, s in seen]

    # The node as the goal has it: OWN_PODS pods and the one being measured. Each pod is created (and seen by the
    # agent's watch), addressed, timed, deleted (and its rule gone) before the next.
    began, samples = time.monotonic(), []
    own = len(plan["own"])
    for i in range(lat["count"]):
        name, ip = f"one-{i}", f"10.244.{50 + i // 250}.{1 + i % 250}"
        create(name)
        until("the agent's watch to see the new pod", lambda: node_pods() == own + 1)
        samples.append(address(name, ip))
        api.call("DELETE", f"{pod_path}/{name}?gracePeriodSeconds=0",
                 {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0})
        until("the deleted pod's rule to go", lambda: ip not in kernel.rules and node_pods() == own)
    report("podip_one", samples)
    result("latency_one_s", f"{time.monotonic() - began:.1f}")

    # The node growing: every pod created first (without an address), then addressed one after another, so the
    # node holds OWN_PODS + i tables when pod i is timed.
    began = time.monotonic()
    for i in range(lat["count"]):
        create(f"lat-{i}")
    until(f"the agent's watch to hold {own + lat['count']} pods", lambda: node_pods() == own + lat["count"],
          60, 0.1)
    time.sleep(1)
    result("latency_create_s", f"{time.monotonic() - began:.1f}")
    began = time.monotonic()
    samples = [address(f"lat-{i}", f"10.244.{100 + i // 250}.{1 + i % 250}") for i in range(lat["count"])]
    from_issue = report("podip_grow", samples)
    tenth = max(1, len(from_issue) // 10)
    result("podip_grow_first_tenth", fmt(stats(from_issue[:tenth])))
    result("podip_grow_last_tenth", fmt(stats(from_issue[-tenth:])))
    result("latency_grow_s", f"{time.monotonic() - began:.1f}")
    began = time.monotonic()
    lat_ips = {f"10.244.{100 + i // 250}.{1 + i % 250}" for i in range(lat["count"])}
    issued, _, _, _ = api.call("DELETE", f"/api/v1/namespaces/{lat['ns']}/pods?gracePeriodSeconds=0",
                               {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0})
    if not kernel.wait(lambda k: not lat_ips & k.rules.keys(), 120):
        raise SystemExit("the latency pods' rules stayed after the pods were deleted")
    result("latency_pods_deleted_rules_gone_ms", f"{(time.monotonic() - issued) * 1e3:.0f}")
    result("latency_delete_s", f"{time.monotonic() - began:.1f}")

    # --- policy edit -> every table of its pods
    began = time.monotonic()

    def select(code):
        spec = {"spec": {"rules": [{"destination": {"cidr": "10.0.0.0/8"}},
                                   {"gateway": {"selector": f"egress-code == '{code}'",
                                                "namespaceSelector": "projectcalico.org/name == 'egress'"}}]}}
        return lambda: api.call("PATCH", "/apis/projectcalico.org/v3/egressgatewaypolicies/pol0", spec,
                                "application/merge-patch+json")[:2]

    edits = []
    for r in range(plan["policy_edits"] + plan["policy_edits"] % 2):  # an even number: pol0 ends on c0
        code = "c1" if r % 2 == 0 else "c0"
        got = kernel.timed(routes_are(of_code(code)), select(code))
        if got is None:
            raise SystemExit(f"policy edit {r} (pol0 -> {code}) never reached every table of pol0's pods")
        if r < plan["policy_edits"]:
            edits.append(got[2] - got[0])
        time.sleep(0.3)
    result("policy_edit", fmt(stats(edits)))
    result("policy_phase_s", f"{time.monotonic() - began:.1f}")

    # --- gateway deleted -> next hop gone, recreated -> back
    began = time.monotonic()
    gw = plan["gateways"][0]
    assert gw["code"] == "c0"
    deleted, recreated = [], []
    for r in range(plan["gateway_deletes"]):
        delete = lambda: api.call("DELETE", f"/api/v1/namespaces/{gw['ns']}/pods/{gw['name']}?gracePeriodSeconds=0",
                                  {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0})[:2]
        got = kernel.timed(routes_are(of_code("c0") - {gw["ip"]}), delete)
        if got is None:
            raise SystemExit(f"gateway delete {r}: pol0's tables still use {gw['ip']}")
        deleted.append(got[2] - got[0])
        time.sleep(0.3)

        def create():
            api.call("POST", f"/api/v1/namespaces/{gw['ns']}/pods", gw["object"])
            return api.pod_status(gw["ns"], gw["name"], gw["ip"])[:2]

        got = kernel.timed(routes_are(of_code("c0")), create)
        if got is None:
            raise SystemExit(f"gateway recreate {r}: pol0's tables never used {gw['ip']} again")
        recreated.append(got[2] - got[0])
        time.sleep(0.3)
    result("gateway_delete", fmt(stats(deleted)))
    result("gateway_recreate", fmt(stats(recreated)))
    result("gateway_phase_s", f"{time.monotonic() - began:.1f}")
    result("netlink_overflows", kernel.overflows)


if __name__ == "__main__":
    {"status": cmd_status, "responder": cmd_responder, "measure": cmd_measure}[sys.argv[1]](*sys.argv[2:])
EOF

# --- the cluster
phase "cluster objects"
python3 - "$DIR" "$OTHER_PODS" "$NODES" "$OWN_PODS" "$GATEWAYS" "$NAMESPACES" "$POLICIES" "$LATENCY_PODS" \
  "$POLICY_EDITS" "$GATEWAY_DELETES" "$PARALLEL" <<'EOF'
import json, sys
d = sys.argv[1]
other, nodes, own, gws, nss, pols, lat, edits, deletes, parallel = map(int, sys.argv[2:])
def pod(ns, name, node, labels):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}]}}
def namespace(name, policy=None, labels=None):
    meta = {"name": name, "labels": labels or {}}
    if policy is not None:
        meta["annotations"] = {"egress.projectcalico.org/egressGatewayPolicy": policy}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}
def items(objects):
    return {"apiVersion": "v1", "kind": "List", "items": objects}
namespaces = [namespace(f"ns{i}", f"pol{i % pols}", {"team": f"t{i % 10}"}) for i in range(nss)]
namespaces += [namespace("egress"), namespace("egscale-latency", "pol0")]
json.dump(items(namespaces), open(f"{d}/namespaces.json", "w"))
policies = [{"apiVersion": "projectcalico.org/v3", "kind": "EgressGatewayPolicy", "metadata": {"name": f"pol{p}"},
             "spec": {"rules": [{"destination": {"cidr": "10.0.0.0/8"}},
                                {"gateway": {"selector": f"egress-code == 'c{p}'",
                                             "namespaceSelector": "projectcalico.org/name == 'egress'"}}]}}
            for p in range(pols)]
json.dump(items(policies), open(f"{d}/policies.json", "w"))
own_pods = [{"ns": f"ns{i % nss}", "name": f"own-{i}", "ip": f"10.244.{200 + i // 250}.{1 + i % 250}",
             "policy": (i % nss) % pols} for i in range(own)]
gateways = [{"ns": "egress", "name": f"gw-{k}", "ip": f"172.18.{1 + k // 250}.{1 + k % 250}", "code": f"c{k % pols}",
             "object": pod("egress", f"gw-{k}", f"gw-node-{k}",
                           {"egress-code": f"c{k % pols}", "egress-gateway/gateway": "true"})} for k in range(gws)]
mine = [pod(p["ns"], p["name"], "node-a", {"app": "web"}) for p in own_pods] + [g["object"] for g in gateways]
json.dump(items(mine), open(f"{d}/mine.json", "w"))
json.dump({"kubeconfig": f"{d}/kube/kubeconfig", "node": "node-a", "own": own_pods, "gateways": gateways,
           "latency": {"ns": "egscale-latency", "count": lat}, "policy_edits": edits, "gateway_deletes": deletes},
          open(f"{d}/plan.json", "w"))
with open(f"{d}/gateway-ips", "w") as f:
    f.write(" ".join(g["ip"] for g in gateways) + "\n")
# In namespace order (a namespace's pods one after another): kube-apiserver's LimitRanger admission looks up a
# namespace's LimitRanges live when it has none, and caches that answer for 30 s; created round-robin over 1,000
# namespaces every create missed that cache and waited ~90 ms for a consistent read (18 pods/s instead of ~200).
others = [pod(f"ns{i * nss // other}", f"p-{i}", f"node-{1 + i % nodes}", {"app": f"a{i % 50}"})
          for i in range(other)]
chunk = (len(others) + parallel - 1) // max(parallel, 1) if others else 0
for k in range(parallel):
    part = others[k * chunk:(k + 1) * chunk] if chunk else []
    json.dump(items(part), open(f"{d}/others-{k}.json", "w"))
EOF
K create -f "$DIR/namespaces.json" >/dev/null
K create -f "$DIR/policies.json" >/dev/null
K create -f "$DIR/mine.json" >/dev/null
in_ns python3 "$DIR/scale.py" status "$DIR/plan.json"
if ((OTHER_PODS > 0)); then
  phase "other pods (bulk create)"
  log "creating $OTHER_PODS pods on $NODES other nodes ($PARALLEL kubectl processes)..."
  t0=$(date +%s)
  for ((k = 0; k < PARALLEL; k++)); do
    # Not through K (a function run in the background is a subshell): $! must be kubectl's own pid.
    ip netns exec "$NS" "$KUBECTL" --kubeconfig "$DIR/kube/kubeconfig" create -f "$DIR/others-$k.json" >/dev/null &
    BG_PIDS+=($!)
  done
  for p in "${BG_PIDS[@]}"; do wait "$p"; done
  BG_PIDS=()
  log "created in $(($(date +%s) - t0)) s"
fi
rm -f "$DIR"/others-*.json
phase "one full dump (kubectl get -o yaml)"
K get namespaces,pods -A -o yaml >"$DIR/dump.yaml"
dump_bytes=$(wc -c <"$DIR/dump.yaml")
total=$(grep -c '^  kind: Pod$' "$DIR/dump.yaml" || true)
rm -f "$DIR/dump.yaml"

# --- the gateways' probe responder, the agent
phase "agent start to ready"
read -r -a gateway_ips <"$DIR/gateway-ips"
for ip in "${gateway_ips[@]}"; do ip -n "$GWNS" addr add "$ip/16" dev u1; done
ip netns exec "$GWNS" python3 "$DIR/scale.py" responder 8080 "${gateway_ips[@]}" >"$DIR/responder.out" 2>&1 &
RESPONDER_PID=$!
until grep -q ready "$DIR/responder.out" 2>/dev/null; do
  kill -0 "$RESPONDER_PID" 2>/dev/null || { cat "$DIR/responder.out" >&2; die "the probe responder exited"; }
  sleep 0.05
done
cat >"$DIR/node.yaml" <<EOF
node_name: node-a
underlay_ip: 172.18.0.2
cluster_cidrs: [10.244.0.0/16, 10.96.0.0/12]
tables: { first: 1000, last: $((1000 + OWN_PODS + LATENCY_PODS + 100)) }
kubernetes: { kubeconfig: $DIR/kube/kubeconfig }
health: { port: 8080, interval: 1s, timeout: 100ms }
listen: 127.0.0.1:9101
EOF
# "VERB=N ..." over pods, namespaces and policies (every client), then the WATCHes open now.
api_requests() {
  K get --raw /metrics | awk '/^apiserver_request_total\{/ && /resource="(pods|namespaces|egressgatewaypolicies)"/ {
      match($0, /verb="[A-Z]+"/); v = substr($0, RSTART + 6, RLENGTH - 7); n[v] += $NF }
    /^apiserver_longrunning_requests\{/ && /verb="WATCH"/ && /resource="(pods|namespaces|egressgatewaypolicies)"/ { w += $NF }
    END { for (v in n) printf "%s=%d ", v, n[v]; printf "open WATCHes=%d\n", w }'
}
# The requests between two api_requests readings, by verb (LIST and WATCH always named).
api_delta() {
  awk -v a="$1" -v b="$2" 'BEGIN {
      n = split(a, x, " "); for (i = 1; i <= n; i++) if (split(x[i], kv, "=") == 2) before[kv[1]] = kv[2]
      n = split(b, x, " "); for (i = 1; i <= n; i++) if (split(x[i], kv, "=") == 2) after[kv[1]] = kv[2]
      after["LIST"] += 0; after["WATCH"] += 0
      for (v in after) if (v != "WATCHes") out = out sprintf("%s %d, ", v, after[v] - before[v])
      printf "%s(open WATCHes %d at the end)\n", substr(out, 1, length(out) - 2) ", ", after["WATCHes"] }'
}
agent_metrics() { in_ns curl -fsS 127.0.0.1:9101/metrics; }
kib() { awk -v k="$1:" '$1 == k {print $2}' "/proc/$AGENT_PID/status"; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
before=$(api_requests)
start_ns=$(date +%s%N)
# `ip netns exec` execs the agent: $! is the agent's own pid (not a subshell's), for /proc/PID/status.
ip netns exec "$NS" "$BIN" node --config "$DIR/node.yaml" >"$DIR/agent.log" 2>&1 &
AGENT_PID=$!
until in_ns curl -fsS -o /dev/null 127.0.0.1:9101/readiness 2>/dev/null; do
  kill -0 "$AGENT_PID" 2>/dev/null || die "the agent exited"
  sleep 0.05
done
ready_ms=$((($(date +%s%N) - start_ns) / 1000000))
synced=$(grep -o 'every watch has listed.*' "$DIR/agent.log" | sed 's/\x1b\[[0-9;]*m//g' | head -1)
healthy=$(agent_metrics | grep -c '^egress_node_gateway_health{.*state="healthy".* 1$' || true)
((healthy == GATEWAYS)) || log "warning: only $healthy of $GATEWAYS gateways are healthy"
after_sync=$(api_requests)

phase "steady state (${STEADY_SECONDS} s)"
rss_start=$(kib VmRSS)
sleep "$STEADY_SECONDS" & # in the background: a signal is handled at once, not after the sleep
BG_PIDS=($!)
wait "${BG_PIDS[0]}"
BG_PIDS=()
steady=$(api_requests)
rss_end=$(kib VmRSS)
objects=$(agent_metrics | grep '^egress_node_cluster_objects' | sed 's/egress_node_cluster_objects{watch="\([a-z_]*\)"} /\1=/' | tr '\n' ' ')
pods=$(agent_metrics | awk '/^egress_node_pods / {print $2}')

phase "podIP->rule, policy edits, gateway deletes"
measure_line=$(wc -l <"$DIR/agent.log")
ip netns exec "$NS" python3 "$DIR/scale.py" measure "$DIR/plan.json" "$DIR/measure.out" &
MEASURE_PID=$!
wait "$MEASURE_PID"
MEASURE_PID=""
phase
r() { sed -n "s/^$1=//p" "$DIR/measure.out"; }
# How long the agent's own kernel writes took in the measurements (its "kernel updated ... took_us" lines after the
# steady state, reason "cluster"; the planning before each write is not in it), with between MIN and MAX pods on
# the node: the part of each latency spent in netlink.
kernel_writes() {
  sed 's/\x1b\[[0-9;]*m//g' "$DIR/agent.log" | awk -v since="$measure_line" -v min="$1" -v max="$2" '
    NR > since && /kernel updated/ && /reason="cluster"/ {
      pods = -1; took = -1
      for (i = 1; i <= NF; i++) {
        if ($i ~ /^pods=/) pods = substr($i, 6) + 0
        if ($i ~ /^took_us=/) took = substr($i, 9) + 0
      }
      if (pods >= min && pods <= max && took >= 0) print took / 1000 }' | sort -n |
    awk '{ v[NR] = $1 } END { if (NR == 0) { print "n=0"; exit }
      printf "p50 %.1f ms, p99 %.1f ms, max %.1f ms, n=%d\n", v[int((NR + 1) / 2)], v[int((NR * 99 + 99) / 100)], v[NR], NR }'
}
writes_small=$(kernel_writes 0 $((OWN_PODS + 1)))
writes_large=$(kernel_writes $((OWN_PODS + LATENCY_PODS * 9 / 10)) $((OWN_PODS + LATENCY_PODS)))
rss_final=$(kib VmRSS)
hwm=$(kib VmHWM)

echo "cluster: $total pods ($OTHER_PODS on $NODES other nodes, $OWN_PODS on this node, $GATEWAYS gateways), $((NAMESPACES + 2)) namespaces + system ones, $POLICIES policies"
echo "agent: ready ${ready_ms} ms after start; $synced"
echo "agent: watches hold $objects; opted-in pods programmed: $pods; gateways healthy: $healthy of $GATEWAYS"
echo "agent: VmRSS $(mib "$rss_start") MiB at the start of the steady state, $(mib "$rss_end") MiB at its end, $(mib "$rss_final") MiB after the measurements; peak VmHWM $(mib "$hwm") MiB"
echo "API requests (pods, namespaces, policies; all clients) before the agent: $before"
echo "                                                      after its sync: $after_sync"
echo "                                           after ${STEADY_SECONDS} s of steady state: $steady"
echo "for comparison: one \`kubectl get namespaces,pods -A -o yaml\` is $((dump_bytes / 1024)) KiB (the kubectl sidecar fetched that every 2 s on every node)"

cat <<EOF

==== agent-scale summary ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores) ====
Binary: $BIN of $(date -u -r "$BIN" +%Y-%m-%dT%H:%MZ), HEAD $(git rev-parse --short HEAD 2>/dev/null || echo unknown). Sizes: $total pods in the API server ($OTHER_PODS on $NODES other nodes, created in bulk; $OWN_PODS on the agent's node; $GATEWAYS gateways), $NAMESPACES namespaces (+2), $POLICIES policies; $LATENCY_PODS latency pods; steady state $STEADY_SECONDS s.

| figure | measured | goal |
|---|---|---|
| agent ready after start (every watch listed, first reconcile) | $ready_ms ms | |
| agent VmRSS, start → end of the steady state | $(mib "$rss_start") → $(mib "$rss_end") MiB | ≤ 40 MB, independent of cluster pods |
| agent VmRSS after the measurements / peak VmHWM | $(mib "$rss_final") / $(mib "$hwm") MiB | |
| API requests in the ${STEADY_SECONDS} s steady state (open WATCHes before the agent: ${before##*=}) | $(api_delta "$after_sync" "$steady") | watches only, 0 LIST |
| status.podIP PATCH issued → pod's ip rule in the kernel, node at $OWN_PODS(+1) pods (one pod at a time) | $(r podip_one_from_issue) | p99 ≤ 100 ms |
| … counted from the PATCH's response instead | $(r podip_one_from_return) | |
| … the PATCH's own round trip | $(r podip_one_patch_rtt) | |
| status.podIP PATCH issued → ip rule, node growing from $OWN_PODS to $((OWN_PODS + LATENCY_PODS)) pods (one at a time) | $(r podip_grow_from_issue) | |
| … the first tenth of these pods (fewest tables on the node) | $(r podip_grow_first_tenth) | |
| … the last tenth (most tables) | $(r podip_grow_last_tenth) | |
| … counted from the PATCH's response instead | $(r podip_grow_from_return) | |
| policy edit (PATCH issued) → all $(r pol0_tables) tables of its pods updated | $(r policy_edit) | ≤ 200 ms |
| gateway pod deleted (gracePeriodSeconds=0, DELETE issued) → its next hop gone from $(r pol0_tables) tables | $(r gateway_delete) | ≤ 200 ms, via the watch |
| gateway pod recreated (status.podIP PATCH issued) → next hop back (includes its first probe) | $(r gateway_recreate) | |
| $LATENCY_PODS latency pods deleted (one deletecollection) → all their rules gone | $(r latency_pods_deleted_rules_gone_ms) ms | |
| the agent's kernel writes (its log: kernel updated, took_us), node at ≤ $((OWN_PODS + 1)) pods | $writes_small | |
| … with the node at $((OWN_PODS + LATENCY_PODS * 9 / 10))–$((OWN_PODS + LATENCY_PODS)) pods (the last tenth above) | $writes_large | |

podIP rules missing after 10 s: $(r podip_one_missing) + $(r podip_grow_missing); rules seen before the PATCH's response: $(r podip_one_before_response) + $(r podip_grow_before_response); netlink overflows: $(r netlink_overflows)
Phase wall times: $(printf '%s' "$PHASES" | paste -sd ';' | sed 's/;/; /g'); in the measurements: podIP at $OWN_PODS pods $(r latency_one_s) s, creating the growing pods $(r latency_create_s) s, their podIP writes $(r latency_grow_s) s, deleting them $(r latency_delete_s) s, policy edits $(r policy_phase_s) s, gateway deletes $(r gateway_phase_s) s
EOF
