#!/usr/bin/env bash
# Static validation of the deployment artefacts (no Docker engine, no cluster, no network after the tools
# are installed):
#
#   1. hadolint   Dockerfile (.hadolint.yaml: any finding fails)
#   2. shellcheck deploy/*.sh; yamllint   --strict on every hand-written YAML file (.yamllint.yaml; Helm templates excluded)
#   3. helm lint  --strict on the chart, with its defaults and with each deploy/helm-values/*.yaml
#      (helm lint downgrades template `fail` to INFO, so the defaults lint clean although the chart refuses
#      to render them without config.apps/config.callers; step 5 checks that refusal)
#   4. helm template | kubernetes-validate --strict, for each value set, against the oldest Kubernetes the
#      chart supports (Chart.yaml kubeVersion) and the newest kubernetes-validate bundles; rendered with
#      --api-versions monitoring.coreos.com/v1 so the ServiceMonitor is covered too. kubernetes-validate has
#      no schema for that CRD and only *warns* about unknown kinds (exit 0), which would also let a removed
#      API version (e.g. policy/v1beta1) slip through; so any "Couldn't find schema" warning fails here,
#      except for ServiceMonitor, which is checked against a bundled subset of the Prometheus Operator schema
#      instead. A few semantic checks on the rendered objects follow (ports vs. config, hardening, HPA).
#      NOTES.txt is rendered for each value set as well.
#   5. every deploy/helm-values/invalid/*.yaml must be REJECTED by helm, for the reason its "# expect:" line
#      names; the chart must refuse a Kubernetes version older than it claims to support.
#   6. deploy/docker-compose.yml: consistent with the Dockerfile (build targets, user, ports, config path)
#      and its inline broker config passes the chart's schema for `config`.
#   7. when .venv can import broker.config: every rendered broker.yaml (and the compose one) passes the
#      broker's own parse_settings; otherwise those checks are reported as skipped.
#
# Usage: deploy/validate.sh        (installs the tools into .tools/ first, see deploy/install-tools.sh)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
START=$(date +%s)

export TOOLS_DIR="${TOOLS_DIR:-$ROOT/.tools}"
"$ROOT/deploy/install-tools.sh"

TOOLS="$TOOLS_DIR"
export PATH="$TOOLS/bin:$PATH"
# Keep helm away from the user's repositories, plugins and cache.
export HELM_CACHE_HOME="$TOOLS/helm-home/cache" HELM_CONFIG_HOME="$TOOLS/helm-home/config" \
       HELM_DATA_HOME="$TOOLS/helm-home/data"
if [[ -x "$TOOLS/venv/bin/python" ]]; then
  TOOLS_PY=("$TOOLS/venv/bin/python")
else
  TOOLS_PY=(env "PYTHONPATH=$TOOLS/pylib" python3)
fi

CHART=helm/token-broker
VALUES_DIR=deploy/helm-values
# Oldest: Chart.yaml kubeVersion (>=1.28.0-0). Newest: the newest schema set kubernetes-validate bundles.
K8S_OLDEST=1.28.0
K8S_NEWEST="$("${TOOLS_PY[@]}" - <<'PY'
import importlib.resources, re
root = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
vs = [tuple(map(int, m.groups())) for p in root.iterdir()
      if (m := re.fullmatch(r"v(\d+)\.(\d+)\.(\d+)-local-strict", p.name))]
print("%d.%d.%d" % max(vs))
PY
)"
K8S_VERSIONS=("$K8S_OLDEST" "$K8S_NEWEST")
RELEASE=token-broker
NAMESPACE=token-broker

WORK="$(mktemp -d "${TMPDIR:-/tmp}/validate.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

CHECKS=0
FAILURES=()
ok()   { CHECKS=$((CHECKS + 1)); printf '  ok    %s\n' "$*"; }
bad()  { CHECKS=$((CHECKS + 1)); FAILURES+=("$*"); printf '  FAIL  %s\n' "$*"; }
section() { printf '\n== %s\n' "$*"; }
# run "description" cmd...: record ok/FAIL, show the output only on failure
run() {
  local desc="$1"; shift
  if "$@" >"$WORK/out" 2>&1; then ok "$desc"; else bad "$desc"; sed 's/^/        /' "$WORK/out"; fi
}

# Python checks shared by the steps below (uses the tools venv: PyYAML + jsonschema).
cat >"$WORK/checks.py" <<'PY'
import json, re, sys
import jsonschema, yaml

def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]

def fail(msg):
    print(msg); sys.exit(1)

# Subset of the Prometheus Operator ServiceMonitor schema covering every field the chart can render.
DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
RELABEL = {"type": "array", "items": {"type": "object", "additionalProperties": False, "properties": {
    "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"}},
    "separator": {"type": "string"}, "targetLabel": {"type": "string"}, "regex": {"type": "string"},
    "modulus": {"type": "integer"}, "replacement": {"type": "string"},
    "action": {"enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod",
                        "labelmap", "LabelMap", "labeldrop", "LabelDrop", "labelkeep", "LabelKeep",
                        "lowercase", "Lowercase", "uppercase", "Uppercase", "keepequal", "KeepEqual",
                        "dropequal", "DropEqual"]}}}}
LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
SERVICEMONITOR = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "additionalProperties": False, "required": ["name"], "properties": {
            "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 253},
            "namespace": {"type": "string"}, "labels": LABELS, "annotations": LABELS}},
        "spec": {"type": "object", "additionalProperties": False, "required": ["selector", "endpoints"], "properties": {
            "jobLabel": {"type": "string"},
            "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
            "selector": {"type": "object", "additionalProperties": False, "properties": {
                "matchLabels": LABELS, "matchExpressions": {"type": "array"}}},
            "endpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "properties": {
                    "port": {"type": "string"}, "targetPort": {}, "path": {"type": "string"},
                    "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                    "interval": DURATION, "scrapeTimeout": DURATION, "honorLabels": {"type": "boolean"},
                    "relabelings": RELABEL, "metricRelabelings": RELABEL}}}}}}}

def by_kind(docs, kind):
    return [d for d in docs if d.get("kind") == kind]

def check_rendered(rendered, values_file, expect_sm):
    """ServiceMonitor against the subset schema + semantic checks across the rendered objects."""
    docs = load_all(rendered)
    values = (yaml.safe_load(open(values_file)) or {}) if values_file else {}
    sms = by_kind(docs, "ServiceMonitor")
    want = bool(expect_sm == "1" and (values.get("serviceMonitor") or {}).get("enabled"))
    if bool(sms) != want:
        fail(f"expected {'a' if want else 'no'} ServiceMonitor, rendered {len(sms)}")
    for sm in sms:
        jsonschema.validate(sm, SERVICEMONITOR)
    (dep,) = by_kind(docs, "Deployment")
    (svc,) = by_kind(docs, "Service")
    pod = dep["spec"]["template"]
    (ctr,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in ctr["ports"]}
    # Service selects the pods and exposes both named ports.
    sel = svc["spec"]["selector"]
    if any(pod["metadata"]["labels"].get(k) != v for k, v in sel.items()):
        fail("Service selector does not match the pod labels")
    if {p["targetPort"] for p in svc["spec"]["ports"]} != {"http", "metrics"}:
        fail("Service must expose the http and metrics ports")
    for sm in sms:
        if any(svc["metadata"]["labels"].get(k) != v for k, v in sm["spec"]["selector"]["matchLabels"].items()):
            fail("ServiceMonitor selector does not match the Service labels")
    # Rendered broker config agrees with the container ports.
    cms = by_kind(docs, "ConfigMap")
    if cms:
        cfg = yaml.safe_load(cms[0]["data"]["broker.yaml"])
        if cfg["listen"]["port"] != ports["http"] or cfg["metrics"]["port"] != ports["metrics"]:
            fail("broker.yaml listen/metrics ports differ from the container ports")
        if "checksum/config" not in pod["metadata"].get("annotations", {}):
            fail("pod template lacks the checksum/config annotation")
    env = {e["name"]: e for e in ctr.get("env", [])}
    if "BROKER_CONFIG" not in env:
        fail("BROKER_CONFIG not set")
    # Listen addresses and the extra CA reach the broker as env overrides, so they hold whatever the
    # config file says (with config.existingSecret it is the user's own, perhaps without listen:).
    want = {"BROKER_LISTEN_HOST": "0.0.0.0", "BROKER_LISTEN_PORT": str(ports["http"]),
            "BROKER_METRICS_HOST": "0.0.0.0", "BROKER_METRICS_PORT": str(ports["metrics"])}
    chart_values = yaml.safe_load(open("helm/token-broker/values.yaml"))
    extra_ca = {**chart_values["extraCA"], **(values.get("extraCA") or {})}
    if extra_ca["configMap"] or extra_ca["secret"]:
        mount = extra_ca["mountPath"].rstrip("/")
        want["BROKER_OUTBOUND_CA_FILE"] = f"{mount}/{extra_ca['key']}"
        if mount not in [m["mountPath"] for m in ctr["volumeMounts"]]:
            fail(f"extraCA set but nothing is mounted at {mount}")
    got = {name: env[name].get("value") for name in want if name in env}
    if got != want:
        fail(f"broker env overrides: expected {want}, rendered {got}")
    # Probes.
    if ctr["readinessProbe"]["httpGet"]["path"] != "/readyz" or ctr["livenessProbe"]["httpGet"]["path"] != "/healthz" \
            or ctr["startupProbe"]["httpGet"]["path"] != "/healthz":
        fail("probes must be readiness=/readyz, liveness/startup=/healthz")
    # TLS on the API port: listen.tls in broker.yaml and HTTPS probes, together or not at all.
    tls = bool((values.get("tls") or {}).get("enabled"))
    schemes = {ctr[p]["httpGet"].get("scheme", "HTTP") for p in ("readinessProbe", "livenessProbe", "startupProbe")}
    if schemes != {"HTTPS" if tls else "HTTP"}:
        fail(f"probe schemes {schemes} do not match tls.enabled={tls}")
    if cms and bool(cfg["listen"].get("tls")) != tls:
        fail(f"broker.yaml listen.tls does not match tls.enabled={tls}")
    # Hardening (none of the value sets overrides it).
    psc, csc = pod["spec"].get("securityContext", {}), ctr.get("securityContext", {})
    hard = [psc.get("runAsNonRoot") or csc.get("runAsNonRoot"), csc.get("readOnlyRootFilesystem"),
            csc.get("allowPrivilegeEscalation") is False, "ALL" in csc.get("capabilities", {}).get("drop", []),
            (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault",
            any(m["mountPath"] == "/tmp" for m in ctr["volumeMounts"])]
    if not all(hard):
        fail(f"pod is not hardened as expected: {hard}")
    # Replicas: owned by the HPA when there is one, else >= 2.
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    if hpas and "replicas" in dep["spec"]:
        fail("Deployment sets replicas although an HPA owns them")
    if not hpas and dep["spec"].get("replicas", 1) < 2:
        fail("fewer than 2 replicas without an HPA")
    if hpas and hpas[0]["spec"]["minReplicas"] < 2:
        fail("HPA minReplicas < 2")
    if dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] != 0:
        fail("rolling update must keep maxUnavailable 0")
    # Workload identity: pod label + ServiceAccount annotation travel together.
    wi = pod["metadata"]["labels"].get("azure.workload.identity/use") == "true"
    for sa in by_kind(docs, "ServiceAccount"):
        ann = (sa["metadata"].get("annotations") or {})
        if wi and "azure.workload.identity/client-id" not in ann and (values.get("workloadIdentity") or {}).get("clientId"):
            fail("workload identity enabled but the ServiceAccount has no client-id annotation")
    print(f"{len(docs)} objects: " + ", ".join(sorted(d['kind'] for d in docs)))

def check_kv_output(output):
    """kubernetes-validate: every object passed; unknown kinds only for ServiceMonitor."""
    text = open(output).read()
    unknown = re.findall(r"Couldn't find schema for kind (\S+) with api version (\S+)", text)
    others = [u for u in unknown if u != ("ServiceMonitor", "monitoring.coreos.com/v1")]
    if others:
        fail(f"no schema (unknown or removed API) for: {others}")
    if "ERROR" in text:
        fail(text)

def check_compose(compose_file, dockerfile, schema_file):
    c = yaml.safe_load(open(compose_file))
    df = open(dockerfile).read()
    stages = set(re.findall(r"(?im)^FROM\s+\S+\s+AS\s+(\S+)", df))
    exposed = set(re.findall(r"(?m)^EXPOSE\s+(.+)$", df)[0].split())
    svcs = c["services"]
    for name, svc in svcs.items():
        build = svc.get("build")
        if build:
            if build["dockerfile"] != "Dockerfile" or build["context"] != "..":
                fail(f"{name}: must build ../Dockerfile")
            if build.get("target") not in stages:
                fail(f"{name}: build target {build.get('target')!r} is not a Dockerfile stage {sorted(stages)}")
    broker = svcs["broker"]
    if broker["build"]["target"] != "runtime" or not broker.get("read_only") or broker.get("user") != "10001:10001":
        fail("broker must run the runtime stage as 10001:10001 with a read-only root fs")
    if not any(str(t).startswith("/tmp") for t in broker.get("tmpfs", [])):
        fail("broker needs a tmpfs at /tmp")
    if not re.search(r'(?m)^USER 10001:10001$', df) or 'ENTRYPOINT ["tini", "--", "token-broker"]' not in df:
        fail("Dockerfile must run token-broker under tini as 10001:10001")
    if broker["configs"][0]["target"] != broker["environment"]["BROKER_CONFIG"]:
        fail("compose mounts the broker config somewhere other than BROKER_CONFIG")
    # Published ports (on the emulator, whose netns the broker shares) match EXPOSE and the config.
    net_owner = svcs[broker["network_mode"].split(":", 1)[1]] if "network_mode" in broker else broker
    published = {p.rsplit(":", 1)[1] for p in net_owner.get("ports", [])}
    if published != exposed:
        fail(f"published ports {published} differ from EXPOSE {exposed}")
    # Inline broker config (defaults of ${VAR:-default} substituted) vs. the chart's config schema.
    raw = c["configs"][broker["configs"][0]["source"]]["content"]
    cfg = yaml.safe_load(re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", raw))
    if {str(cfg["listen"]["port"]), str(cfg["metrics"]["port"])} != exposed:
        fail("compose broker config ports differ from EXPOSE")
    schema = json.load(open(schema_file))
    sub = dict(schema["properties"]["config"], definitions=schema["definitions"])
    jsonschema.validate({k: v for k, v in cfg.items() if k not in ("listen", "metrics")}, sub)
    emu = svcs["emulator"]["command"]
    if emu[:3] != ["python", "-m", "emulator"]:
        fail("emulator must run python -m emulator")
    print("services: " + ", ".join(svcs))

if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"rendered": check_rendered, "kv-output": check_kv_output, "compose": check_compose}[cmd](*args)
PY
check() { "${TOOLS_PY[@]}" "$WORK/checks.py" "$@"; }

# Cross-check with the service itself: when the project venv can import broker.config, every broker.yaml
# the chart renders (and the compose demo's) must pass the broker's own validation (parse_settings).
# broker/ is developed alongside; if it does not import yet, the check is reported as skipped, not failed.
BROKER_PY="$ROOT/.venv/bin/python"
cat >"$WORK/broker_parse.py" <<'PY'
import re, sys, yaml
from broker.config import parse_settings
kind, path = sys.argv[1:]
if kind == "rendered":
    cms = [d for d in yaml.safe_load_all(open(path)) if d and d.get("kind") == "ConfigMap"]
    if not cms:
        print("no ConfigMap (config.existingSecret)"); sys.exit(0)
    raw = yaml.safe_load(cms[0]["data"]["broker.yaml"])
    # A Redis URL from redis.existingSecret reaches the pod as BROKER_REDIS_URL: stand in for it (TLS, as
    # such URLs usually are), so the Redis settings beside it are checked as the pod will see them.
    pods = [d for d in yaml.safe_load_all(open(path)) if d and d.get("kind") == "Deployment"]
    env_names = {e["name"] for d in pods for c in d["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])}
    environ = {"BROKER_REDIS_URL": "rediss://:secret@redis.example:6380/0"} if "BROKER_REDIS_URL" in env_names else {}
else:  # compose: the inline config, ${VAR:-default} replaced by its default
    c = yaml.safe_load(open(path))
    text = c["configs"]["broker-config"]["content"]
    raw = yaml.safe_load(re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", text))
    environ = {}
tls = (raw.get("listen") or {}).get("tls")
if tls:  # the files live in the pod's Secret mount: stand in a real pair so the rest is checked too
    import tempfile, trustme
    leaf, tmp = trustme.CA().issue_cert("token-broker"), tempfile.mkdtemp()
    leaf.cert_chain_pems[0].write_to_path(f"{tmp}/tls.crt"); leaf.private_key_pem.write_to_path(f"{tmp}/tls.key")
    print(f"listen.tls {tls['cert_file']} {tls['key_file']}: checked with a stand-in pair")
    tls.update(cert_file=f"{tmp}/tls.crt", key_file=f"{tmp}/tls.key")
# The other files the config names (CA, credential files) exist only inside the pod / container.
s = parse_settings(raw, environ, check_files=False)
print(f"apps={sorted(s.apps)} callers={sorted(s.callers)} listen={s.listen.host}:{s.listen.port}")
PY
if [[ -x "$BROKER_PY" ]] && (cd "$ROOT" && "$BROKER_PY" -c 'import broker.config') >/dev/null 2>&1; then
  broker_parse() { (cd "$ROOT" && "$BROKER_PY" "$WORK/broker_parse.py" "$@"); }
else
  broker_parse() { return 2; }
fi
SKIPPED=()
# like run, but exit status 2 of the command means "skipped"
run_or_skip() {
  local desc="$1" rc=0; shift
  "$@" >"$WORK/out" 2>&1 || rc=$?
  case $rc in
    0) ok "$desc: $(tail -1 "$WORK/out")" ;;
    2) SKIPPED+=("$desc"); printf '  skip  %s (broker.config not importable from .venv)\n' "$desc" ;;
    *) bad "$desc"; sed 's/^/        /' "$WORK/out" ;;
  esac
}

shopt -s nullglob
VALID_SETS=("$VALUES_DIR"/*.yaml)
INVALID_SETS=("$VALUES_DIR"/invalid/*.yaml)
(( ${#VALID_SETS[@]} > 0 )) || { echo "no value sets in $VALUES_DIR" >&2; exit 1; }
(( ${#INVALID_SETS[@]} > 0 )) || { echo "no invalid value sets in $VALUES_DIR/invalid" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------------------
section "hadolint $(hadolint --version | awk '{print $NF}')"
run "hadolint Dockerfile" hadolint --config .hadolint.yaml Dockerfile

section "shellcheck $(shellcheck --version | sed -n 's/^version: //p')"
run "shellcheck deploy/*.sh" shellcheck deploy/validate.sh deploy/install-tools.sh

section "yamllint"
run "yamllint --strict (config, chart values, value sets, compose, alert rules)" \
  yamllint --strict -c .yamllint.yaml .yamllint.yaml .hadolint.yaml "$CHART/Chart.yaml" "$CHART/values.yaml" \
  "$VALUES_DIR" deploy/docker-compose.yml deploy/prometheus
run "values.schema.json is valid JSON Schema (draft-07)" "${TOOLS_PY[@]}" -c \
  'import json,sys,jsonschema; jsonschema.Draft7Validator.check_schema(json.load(open(sys.argv[1])))' \
  "$CHART/values.schema.json"

section "helm lint --strict ($(helm version --short))"
run "helm lint --strict (chart defaults)" helm lint --strict "$CHART"
for v in "${VALID_SETS[@]}"; do
  run "helm lint --strict -f $v" helm lint --strict "$CHART" -f "$v"
done

# NOTES.txt is not part of `helm template` output; render it through a scratch copy of the chart in which it
# becomes a named template inside a ConfigMap, so a template error in it shows up here and not at install.
NOTES_CHART="$WORK/notes-chart"
cp -r "$CHART" "$NOTES_CHART"
{ echo '{{- define "validate.notes" -}}'; cat "$CHART/templates/NOTES.txt"; echo '{{- end -}}'; } \
  >"$NOTES_CHART/templates/_validate_notes.tpl"
rm "$NOTES_CHART/templates/NOTES.txt"
printf 'apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n  NOTES.txt: {{ include "validate.notes" . | quote }}\n' \
  >"$NOTES_CHART/templates/validate-notes.yaml"

section "helm template | kubernetes-validate --strict (Kubernetes ${K8S_VERSIONS[*]})"
for v in "${VALID_SETS[@]}"; do
  label="$v"
  vargs=(-f "$v")
  for k in "${K8S_VERSIONS[@]}"; do
    out="$WORK/rendered.yaml"
    if ! helm template "$RELEASE" "$CHART" -n "$NAMESPACE" "${vargs[@]}" --kube-version "$k" \
         --api-versions monitoring.coreos.com/v1 >"$out" 2>"$WORK/out"; then
      bad "render $label (k8s $k)"; sed 's/^/        /' "$WORK/out"; continue
    fi
    if kubernetes-validate --strict --quiet -k "$k" - <"$out" >"$WORK/kv.txt" 2>&1 \
       && check kv-output "$WORK/kv.txt" >"$WORK/out" 2>&1; then
      ok "kubernetes-validate $label (k8s $k)"
    else
      bad "kubernetes-validate $label (k8s $k)"; sed 's/^/        /' "$WORK/kv.txt" "$WORK/out"
    fi
    if check rendered "$out" "$v" 1 >"$WORK/out" 2>&1; then
      ok "object checks $label (k8s $k): $(tail -1 "$WORK/out")"
    else
      bad "object checks $label (k8s $k)"; sed 's/^/        /' "$WORK/out"
    fi
  done
  run "NOTES.txt renders: $label" helm template "$RELEASE" "$NOTES_CHART" -n "$NAMESPACE" "${vargs[@]}" \
    --show-only templates/validate-notes.yaml
  # Without the Prometheus Operator API the ServiceMonitor must not be rendered.
  helm template "$RELEASE" "$CHART" -n "$NAMESPACE" "${vargs[@]}" >"$WORK/cm.yaml" 2>/dev/null || true
  run_or_skip "broker.config.parse_settings accepts broker.yaml of $label" broker_parse rendered "$WORK/cm.yaml"
  # shellcheck disable=SC2016  # the single-quoted script gets its values as positional parameters
  run "no ServiceMonitor without monitoring.coreos.com/v1: $label" bash -c \
    'helm template "$1" "$2" -n "$3" ${4:+-f "$4"} --kube-version "$5" >"$6" && "${@:8}" "$7" rendered "$6" "$4" 0' \
    _ "$RELEASE" "$CHART" "$NAMESPACE" "$v" "$K8S_NEWEST" "$WORK/plain.yaml" "$WORK/checks.py" "${TOOLS_PY[@]}"
done

section "value sets that must be rejected"
for v in "${INVALID_SETS[@]}"; do
  expect="$(sed -n 's/^# expect: //p' "$v" | head -1)"
  if [[ -z "$expect" ]]; then bad "$v has no '# expect: <error text>' line"; continue; fi
  if helm template "$RELEASE" "$CHART" -n "$NAMESPACE" -f "$v" >/dev/null 2>"$WORK/out"; then
    bad "$v was ACCEPTED by helm template"
  elif ! grep -qF -- "$expect" "$WORK/out"; then
    bad "$v rejected, but not for the expected reason ($expect)"; sed 's/^/        /' "$WORK/out"
  elif grep -q "don't meet the specifications of the schema" "$WORK/out" \
       && helm lint --strict "$CHART" -f "$v" >/dev/null 2>&1; then
    # Schema violations must fail `helm lint` too. (Cross-field rules enforced with `fail` in the templates
    # cannot: helm lint deliberately downgrades template `fail` to an INFO message.)
    bad "$v was ACCEPTED by helm lint"
  else
    ok "$v rejected: $(grep -F -m1 -- "$expect" "$WORK/out" | sed 's/^[- ]*//')"
  fi
done
# The chart's own defaults have no apps/callers, which the broker would refuse at start: helm must refuse too.
if helm template "$RELEASE" "$CHART" >/dev/null 2>"$WORK/out"; then
  bad "chart defaults (no apps/callers) were ACCEPTED by helm template"
elif grep -qF "config.apps and config.callers need at least one entry" "$WORK/out"; then
  ok "chart defaults rejected: config.apps/config.callers are required"
else
  bad "chart defaults rejected for an unexpected reason"; sed 's/^/        /' "$WORK/out"
fi
if helm template "$RELEASE" "$CHART" -f "${VALID_SETS[0]}" --kube-version 1.27.0 >/dev/null 2>&1; then
  bad "chart renders for Kubernetes 1.27 although Chart.yaml claims >=1.28"
else
  ok "chart refuses Kubernetes 1.27 (kubeVersion >=1.28.0-0)"
fi

section "docker-compose"
run "deploy/docker-compose.yml consistent with Dockerfile and chart config schema" \
  check compose deploy/docker-compose.yml Dockerfile "$CHART/values.schema.json"

run_or_skip "broker.config.parse_settings accepts the compose demo's broker.yaml" \
  broker_parse compose deploy/docker-compose.yml

# ---------------------------------------------------------------------------------------------------------
ELAPSED=$(( $(date +%s) - START ))
echo
if (( ${#FAILURES[@]} )); then
  printf 'validate: FAILED %d of %d checks in %ss:\n' "${#FAILURES[@]}" "$CHECKS" "$ELAPSED"
  printf '  - %s\n' "${FAILURES[@]}"
  exit 1
fi
if (( ${#SKIPPED[@]} )); then
  printf 'validate: note - %d check(s) skipped: broker.config could not be imported from .venv\n' "${#SKIPPED[@]}"
fi
printf 'validate: OK - %d checks passed in %ss (hadolint, shellcheck, yamllint, helm lint, kubernetes-validate %s, %d value sets, %d rejected sets, compose)\n' \
  "$CHECKS" "$ELAPSED" "${K8S_VERSIONS[*]}" "${#VALID_SETS[@]}" "${#INVALID_SETS[@]}"
