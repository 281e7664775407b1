#!/usr/bin/env bash
# Validates the Kubernetes manifests in deploy/:
#
#   1. every Kubernetes object in deploy/ (each file, and the whole of `kubectl kustomize deploy/` when kubectl
#      is there, which adds the generated ConfigMaps) against the Kubernetes JSON schemas of the versions in
#      K8S_VERSIONS, strictly (unknown fields are errors), with the PyPI package kubernetes-validate in a venv
#      under target/; custom resources (ServiceMonitor, NetworkAttachmentDefinition, EgressGatewayPolicy) have no
#      schema there and are checked structurally (apiVersion, kind, metadata.name, spec) — the summary lists them;
#   2. `egress-gateway check` on the gateway configurations and the policies, both as files and as extracted
#      from the rendered ConfigMaps (what the pods will read);
#   3. that every metric the Grafana dashboard queries is one docs/metrics.md or docs/node-agent.md documents.
#
#   K8S_VERSIONS="1.31.0 1.37.0"   Kubernetes versions to validate against (default: the oldest and newest
#                                  that this project supports)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/skip.sh
source scripts/skip.sh

log() { printf '==> %s\n' "$*"; }
K8S_VERSIONS=${K8S_VERSIONS:-"1.31.0 1.37.0"}
KV_VERSION=1.37.0   # kubernetes-validate release (it ships the schemas of 1.25 … 1.37)
start=$SECONDS

# --- tools ---------------------------------------------------------------------------------------------------
venv=target/validate-venv
if [[ ! -x $venv/bin/python ]] || ! "$venv/bin/python" -c 'import kubernetes_validate' 2>/dev/null; then
  log "venv $venv with kubernetes-validate $KV_VERSION (PyPI)"
  rm -rf "$venv"
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    if [[ $(id -u) -eq 0 ]]; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null 2>&1 \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; }
    fi
    rm -rf "$venv"
    python3 -m venv "$venv" 2>/dev/null || /usr/bin/python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$KV_VERSION"
fi

bin=""
for b in target/release/egress-gateway target/debug/egress-gateway \
         target/x86_64-unknown-linux-gnu/release/egress-gateway; do
  if [[ -x $b ]]; then bin=$b; break; fi
done
if [[ -z $bin ]]; then
  log "cargo build -p gateway (for egress-gateway check)"
  cargo build -q --release -p gateway --locked
  bin=target/release/egress-gateway
fi

work=$(mktemp -d /tmp/egress-validate.XXXXXX)
trap 'rm -rf "$work"' EXIT

rendered=""
partial=0
if command -v kubectl >/dev/null 2>&1; then
  log "kubectl kustomize deploy/"
  kubectl kustomize deploy/ > "$work/rendered.yaml"
  rendered=$work/rendered.yaml
else
  skipped "manifests: rendering deploy/kustomization.yaml" "no kubectl; the generated ConfigMaps are not validated"
  partial=1
fi

# --- 1 + 2 + 3 -----------------------------------------------------------------------------------------------
log "schemas (Kubernetes $K8S_VERSIONS, strict), egress-gateway check ($bin), dashboard metrics"
"$venv/bin/python" - "$work" "$bin" "$rendered" $K8S_VERSIONS <<'PY'
import glob, json, os, re, subprocess, sys
import yaml
import kubernetes_validate as kv

work, binary, rendered, versions = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
errors = []
strict, structural = {}, {}   # "file: Kind/name" -> versions validated, or the reason it was structural only

# Generator inputs (gateway and agent configuration, policies, dashboard) are not Kubernetes manifests of
# their own; they are checked below and, rendered into ConfigMaps, with the rest.
kust = yaml.safe_load(open("deploy/kustomization.yaml"))
inputs = {os.path.join("deploy", f) for g in kust.get("configMapGenerator", []) for f in g.get("files", [])}
resources = {os.path.join("deploy", r) for r in kust.get("resources", [])}
files = sorted(f for f in glob.glob("deploy/**/*.yaml", recursive=True) + glob.glob("deploy/**/*.yml", recursive=True)
               if f not in inputs and os.path.basename(f) != "kustomization.yaml")
for f in files:
    # Policies and examples are applied on their own (`kubectl apply -f`), after the CRD is installed.
    if f not in resources and not f.startswith(("deploy/examples/", "deploy/policies/")):
        errors.append(f"{f}: not listed in deploy/kustomization.yaml resources (nor an input, nor under examples/ or policies/)")

def objects(path):
    with open(path) as fh:
        for i, doc in enumerate(yaml.safe_load_all(fh)):
            if doc is None:
                continue
            if doc.get("kind") == "List":
                yield from doc.get("items", [])
            else:
                yield doc

def check_object(origin, obj):
    kind, api = obj.get("kind"), obj.get("apiVersion")
    name = (obj.get("metadata") or {}).get("name")
    key = f"{origin}: {kind}/{name}"
    if not kind or not api or not name:
        errors.append(f"{key}: apiVersion, kind and metadata.name are required")
        return
    done = []
    for v in versions:
        try:
            kv.validate(obj, v, strict=True)
            done.append(v)
        except kv.SchemaNotFoundError:
            # A custom resource: no schema in the core set. Check its shape.
            if not re.fullmatch(r"[a-z0-9.-]+\.[a-z]+/v[0-9]+(alpha[0-9]+|beta[0-9]+)?", api):
                errors.append(f"{key}: apiVersion {api!r} is not GROUP/VERSION")
            if not isinstance(obj.get("spec"), dict):
                errors.append(f"{key}: custom resource without a spec mapping")
            unknown = set(obj) - {"apiVersion", "kind", "metadata", "spec"}
            if unknown:
                errors.append(f"{key}: unexpected top-level fields {sorted(unknown)}")
            meta_unknown = set(obj["metadata"]) - {"name", "namespace", "labels", "annotations"}
            if meta_unknown:
                errors.append(f"{key}: unexpected metadata fields {sorted(meta_unknown)}")
            structural[key] = f"{api} (custom resource: no schema in kubernetes-validate)"
            return
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path) or "(top)"
            errors.append(f"{key}: Kubernetes {v}: {path}: {e.message}")
            return
    strict[key] = done

for f in files:
    try:
        for obj in objects(f):
            check_object(f, obj)
    except yaml.YAMLError as e:
        errors.append(f"{f}: not YAML: {e}")

rendered_objs = []
if rendered:
    rendered_objs = list(objects(rendered))
    for obj in rendered_objs:
        check_object("kustomize", obj)

# egress-gateway check: the files, and what the rendered ConfigMaps hold.
checks = []
for f in sorted(inputs):
    if f.endswith((".yaml", ".yml")) and "/node-agent/" not in f:
        checks.append((f, f))
for obj in rendered_objs:
    if obj.get("kind") != "ConfigMap":
        continue
    for key, text in sorted((obj.get("data") or {}).items()):
        path = os.path.join(work, f"{obj['metadata']['name']}.{key}")
        with open(path, "w") as fh:
            fh.write(text)
        if key.endswith(".json"):
            try:
                json.loads(text)
            except ValueError as e:
                errors.append(f"ConfigMap {obj['metadata']['name']} key {key}: not JSON: {e}")
        elif key == "node.yaml":
            # The agent's own configuration: `check` does not read it (the agent validates it at start).
            try:
                cfg = yaml.safe_load(text)
                if not isinstance(cfg, dict) or ("inputs" not in cfg and "kubernetes" not in cfg):
                    errors.append(f"ConfigMap {obj['metadata']['name']} key {key}: neither `inputs` nor `kubernetes`")
                structural[f"ConfigMap {obj['metadata']['name']} key {key}"] = "node agent configuration (YAML and `inputs` or `kubernetes` only)"
            except yaml.YAMLError as e:
                errors.append(f"ConfigMap {obj['metadata']['name']} key {key}: not YAML: {e}")
        else:
            checks.append((f"ConfigMap {obj['metadata']['name']} key {key}", path))
# The example namespace names a policy: with the policies it must check without a "missing policy" warning.
examples = sorted(glob.glob("deploy/examples/*.yaml"))
policies = sorted(glob.glob("deploy/policies/*.yaml"))
if examples:
    checks.append(("policies + examples together", " ".join(policies + examples)))
checked = []
for label, path in checks:
    r = subprocess.run([binary, "check", *path.split(" ")], capture_output=True, text=True)
    out = (r.stdout + r.stderr).strip().replace(work + "/", "")
    if r.returncode != 0 or "warning" in out:
        errors.append(f"{label}: egress-gateway check failed:\n      " + out.replace("\n", "\n      "))
    else:
        checked.append(f"{label}: " + "; ".join(l.split(': ', 1)[-1] for l in out.splitlines()))

# Every metric in the dashboard is documented (and so exported).
dash = json.load(open("deploy/grafana/egress-gateway.json"))
exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
exprs += [v["query"]["query"] for v in dash["templating"]["list"] if isinstance(v.get("query"), dict)]
used = set()
for e in exprs:
    used |= set(re.findall(r"\b(egress_(?:gateway|node)_[a-z_]+)\b", e))
documented = set(re.findall(r"`(egress_(?:gateway|node)_[a-z_]+)", open("docs/metrics.md").read() + open("docs/node-agent.md").read()))
for m in sorted(used - documented):
    errors.append(f"deploy/grafana/egress-gateway.json: metric {m} is not in docs/metrics.md or docs/node-agent.md")

print(f"  strictly validated against Kubernetes {', '.join(versions)}: {len(strict)} objects")
for k in sorted(strict):
    print(f"    {k}")
print(f"  checked structurally only: {len(structural)}")
for k, why in sorted(structural.items()):
    print(f"    {k}: {why}")
print(f"  egress-gateway check: {len(checked)}")
for c in checked:
    print(f"    {c}")
print(f"  dashboard: {len(dash['panels'])} panels, {len(used)} metrics, all documented" if not (used - documented)
      else f"  dashboard: {len(used - documented)} undocumented metrics")
if errors:
    print(f"\n{len(errors)} problem(s):", file=sys.stderr)
    for e in errors:
        print(f"  {e}", file=sys.stderr)
    sys.exit(1)
PY
if [[ $partial == 1 ]]; then
  log "manifests valid as far as checked ($((SECONDS - start)) s); part was skipped (SKIPPED above)"
  exit "$SKIP_STATUS"
fi
log "manifests valid ($((SECONDS - start)) s)"
