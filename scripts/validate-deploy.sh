#!/usr/bin/env bash
# Validates the deployment files under deploy/ without a cluster or a container engine:
#
#   deploy/kubernetes/*.yaml   Kubernetes objects against the API schemas shipped by the PyPI
#                              package kubernetes-validate (strict: unknown fields are errors).
#                              KEDA's ScaledObject and TriggerAuthentication are custom
#                              resources it has no schema for (it only warns and passes them),
#                              so they get a structural check here instead.
#   kustomization.yaml         lists every manifest (not the *.example.yaml ones), all existing.
#   deploy/**/*.json           parses (python -m json.tool); Grafana dashboards: panel ids
#                              unique, every query has an expression.
#   deploy/prometheus/*.yml    parses; scrape_configs with unique job names.
#   grafana provisioning YAML  parses; apiVersion 1, data sources / dashboard providers.
#
# Usage: scripts/validate-deploy.sh [DEPLOY_DIR]        (default: deploy)
#   PYTHON       interpreter with tests/interop/deploy-requirements.txt installed
#                (default: .venv/bin/python)
#   K8S_VERSION  Kubernetes version to validate against (default: the newest the package has)
#
# Prints one line per file and "deploy: N files valid"; exits non-zero on any problem.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
DEPLOY_DIR="${1:-deploy}"
DEPLOY_DIR="${DEPLOY_DIR%/}"
export K8S_VERSION="${K8S_VERSION:-}"

if ! command -v "$PYTHON" >/dev/null 2>&1 && [ ! -x "$PYTHON" ]; then
  echo "validate-deploy: no Python interpreter at PYTHON=$PYTHON" >&2
  echo "  python3 -m venv .venv && .venv/bin/pip install -r tests/interop/deploy-requirements.txt" >&2
  exit 2
fi
if ! "$PYTHON" -c 'import kubernetes_validate, yaml' 2>/dev/null; then
  echo "validate-deploy: $PYTHON lacks kubernetes-validate or PyYAML; install them with" >&2
  echo "  $PYTHON -m pip install -r tests/interop/deploy-requirements.txt" >&2
  exit 2
fi
if [ ! -d "$DEPLOY_DIR" ]; then
  echo "validate-deploy: no directory $DEPLOY_DIR" >&2
  exit 2
fi

# The checks, run once per file as: python -c "$CHECKER" MODE FILE
# Prints "ok   FILE: details" and exits 0, or prints "FAIL FILE: problem" lines and exits 1.
read -r -d '' CHECKER <<'PY' || true
import json, os, sys
import yaml

mode, path = sys.argv[1], sys.argv[2]
problems = []
details = []

def fail(msg):
    problems.append(" ".join(str(msg).split()))  # one line per problem

def load_yaml_docs(p):
    with open(p) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]

def is_str(v):
    return isinstance(v, str) and v != ""

def kn(doc):
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    return "%s/%s" % (doc.get("kind", "?"), meta.get("name", "?"))

# --- KEDA custom resources (no schema in kubernetes-validate) ---------------------------
KEDA_API = "keda.sh/v1alpha1"
SO_SPEC = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
           "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced",
           "triggers"}
TRIGGER_KEYS = {"type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"}
TA_SPEC = {"secretTargetRef", "env", "hashiCorpVault", "podIdentity", "azureKeyVault",
           "awsSecretManager", "gcpSecretManager", "configMapTargetRef",
           "boundServiceAccountToken", "azureAppConfiguration"}

def check_keda(doc, where, auth_names):
    kind = doc.get("kind")
    if doc.get("apiVersion") != KEDA_API:
        fail("%s: apiVersion must be %s, not %r" % (where, KEDA_API, doc.get("apiVersion")))
    meta = doc.get("metadata")
    if not isinstance(meta, dict) or not is_str(meta.get("name")):
        fail("%s: metadata.name missing" % where)
    spec = doc.get("spec")
    if not isinstance(spec, dict) or not spec:
        fail("%s: spec missing" % where)
        return
    if kind == "TriggerAuthentication":
        unknown = set(spec) - TA_SPEC
        if unknown:
            fail("%s: unknown spec fields %s" % (where, sorted(unknown)))
        refs = spec.get("secretTargetRef", [])
        if not isinstance(refs, list):
            fail("%s: spec.secretTargetRef must be a list" % where)
            refs = []
        for i, ref in enumerate(refs):
            for key in ("parameter", "name", "key"):
                if not isinstance(ref, dict) or not is_str(ref.get(key)):
                    fail("%s: spec.secretTargetRef[%d].%s missing" % (where, i, key))
    elif kind == "ScaledObject":
        unknown = set(spec) - SO_SPEC
        if unknown:
            fail("%s: unknown spec fields %s" % (where, sorted(unknown)))
        target = spec.get("scaleTargetRef")
        if not isinstance(target, dict) or not is_str(target.get("name")):
            fail("%s: spec.scaleTargetRef.name missing" % where)
        lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        if not isinstance(lo, int) or not isinstance(hi, int) or not 0 <= lo <= hi or hi < 1:
            fail("%s: need integers 0 <= minReplicaCount <= maxReplicaCount, maxReplicaCount >= 1"
                 % where)
        triggers = spec.get("triggers")
        if not isinstance(triggers, list) or not triggers:
            fail("%s: spec.triggers must be a non-empty list" % where)
            return
        for i, trig in enumerate(triggers):
            tw = "%s: spec.triggers[%d]" % (where, i)
            if not isinstance(trig, dict) or not is_str(trig.get("type")):
                fail("%s.type missing" % tw)
                continue
            unknown = set(trig) - TRIGGER_KEYS
            if unknown:
                fail("%s: unknown fields %s" % (tw, sorted(unknown)))
            md = trig.get("metadata")
            if not isinstance(md, dict):
                fail("%s.metadata must be a map" % tw)
                continue
            # The CRD types metadata as map[string]string: `value: 100` would be rejected.
            for k, v in md.items():
                if not isinstance(v, str):
                    fail("%s.metadata.%s must be a string (quote it), got %r" % (tw, k, v))
            ref = trig.get("authenticationRef")
            if ref is not None:
                if not isinstance(ref, dict) or not is_str(ref.get("name")):
                    fail("%s.authenticationRef.name missing" % tw)
                elif ref.get("kind", "TriggerAuthentication") == "TriggerAuthentication" \
                        and auth_names and ref["name"] not in auth_names:
                    fail("%s.authenticationRef.name %r matches no TriggerAuthentication in "
                         "this file (%s)" % (tw, ref["name"], ", ".join(sorted(auth_names))))
            if trig["type"] == "rabbitmq":
                if not is_str(md.get("queueName")):
                    fail("%s.metadata.queueName missing" % tw)
                if md.get("protocol", "auto") not in ("amqp", "http", "auto"):
                    fail("%s.metadata.protocol must be amqp, http or auto" % tw)
                if "mode" in md or "value" in md:
                    if md.get("mode") not in ("QueueLength", "MessageRate"):
                        fail("%s.metadata.mode must be QueueLength or MessageRate" % tw)
                    try:
                        float(md.get("value"))
                    except (TypeError, ValueError):
                        fail("%s.metadata.value must be a number in a string" % tw)
                if not (md.get("host") or md.get("hostFromEnv") or ref):
                    fail("%s: the broker address needs metadata.host, hostFromEnv or an "
                         "authenticationRef" % tw)
    else:
        fail("%s: no check for KEDA kind %r" % (where, kind))

def check_k8s():
    import kubernetes_validate.utils as kv
    version = os.environ.get("K8S_VERSION") or kv.latest_version()
    docs = load_yaml_docs(path)
    if not docs:
        fail("no Kubernetes object in the file")
    auth_names = {d.get("metadata", {}).get("name") for d in docs
                  if isinstance(d, dict) and d.get("kind") == "TriggerAuthentication"}
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict) or not is_str(doc.get("apiVersion")) \
                or not is_str(doc.get("kind")):
            fail("document %d: not a Kubernetes object (apiVersion and kind)" % (i + 1))
            continue
        where = kn(doc)
        if doc["apiVersion"].startswith("keda.sh/"):
            check_keda(doc, where, auth_names)
            details.append("%s (KEDA, structural)" % where)
            continue
        try:
            got = kv.validate(doc, version, strict=True)
            details.append("%s (k8s %s schema, strict)" % (where, got))
        except kv.ValidationError as e:
            fail("%s: %s: %s" % (where, ".".join(str(p) for p in e.path) or "(root)", e.message))
        except kv.SchemaNotFoundError as e:
            fail("%s: %s" % (where, e.message))
        except kv.VersionNotSupportedError as e:
            fail(e.message)

def check_kustomization():
    docs = load_yaml_docs(path)
    doc = docs[0] if len(docs) == 1 and isinstance(docs[0], dict) else {}
    if doc.get("apiVersion") != "kustomize.config.k8s.io/v1beta1" \
            or doc.get("kind") != "Kustomization":
        fail("want apiVersion kustomize.config.k8s.io/v1beta1, kind Kustomization")
    resources = doc.get("resources")
    if not isinstance(resources, list) or not resources:
        fail("resources must be a non-empty list")
        return
    here = os.path.dirname(path)
    for r in resources:
        if not os.path.isfile(os.path.join(here, r)):
            fail("resource %s does not exist" % r)
        if ".example." in r:
            fail("resource %s is an example and must not be applied" % r)
    listed = {os.path.normpath(r) for r in resources}
    for name in sorted(os.listdir(here)):
        if name.endswith((".yaml", ".yml")) and ".example." not in name \
                and name not in ("kustomization.yaml", "kustomization.yml") \
                and name not in listed:
            fail("%s is not listed in resources" % name)
    details.append("%d resources" % len(resources))

def check_json():
    with open(path) as f:
        doc = json.load(f)
    if isinstance(doc, dict) and isinstance(doc.get("panels"), list):
        if not isinstance(doc.get("schemaVersion"), int) or not is_str(doc.get("title")):
            fail("dashboard needs schemaVersion and title")
        panels = []
        for p in doc["panels"]:
            panels.append(p)
            panels.extend(p.get("panels", []))  # panels inside collapsed rows
        ids = [p.get("id") for p in panels]
        dup = sorted({i for i in ids if ids.count(i) > 1}, key=str)
        if dup:
            fail("duplicate panel ids %s" % dup)
        queries = 0
        for p in panels:
            if p.get("type") == "row":
                continue
            if not is_str(p.get("title")) or not isinstance(p.get("gridPos"), dict):
                fail("panel %s: title and gridPos required" % p.get("id"))
            targets = p.get("targets") or []
            if not targets:
                fail("panel %r has no queries" % p.get("title"))
            for t in targets:
                if not is_str(t.get("expr")):
                    fail("panel %r: query %s has no expr" % (p.get("title"), t.get("refId")))
                queries += 1
        details.append("dashboard %r, %d panels, %d queries"
                       % (doc.get("title"), len(panels), queries))

def check_prometheus():
    docs = load_yaml_docs(path)
    doc = docs[0] if len(docs) == 1 and isinstance(docs[0], dict) else {}
    jobs = doc.get("scrape_configs")
    if not isinstance(jobs, list) or not jobs:
        fail("scrape_configs must be a non-empty list")
        return
    names = [j.get("job_name") if isinstance(j, dict) else None for j in jobs]
    if not all(is_str(n) for n in names):
        fail("every scrape config needs a job_name")
    dup = sorted({n for n in names if names.count(n) > 1 and n})
    if dup:
        fail("duplicate job_name %s" % dup)
    details.append("jobs %s" % ", ".join(str(n) for n in names))

def check_grafana_provisioning():
    docs = load_yaml_docs(path)
    doc = docs[0] if len(docs) == 1 and isinstance(docs[0], dict) else {}
    if doc.get("apiVersion") != 1:
        fail("apiVersion must be 1")
    if "datasources" in doc:
        for i, ds in enumerate(doc["datasources"] or []):
            if not isinstance(ds, dict) or not is_str(ds.get("name")) \
                    or not is_str(ds.get("type")):
                fail("datasources[%d]: name and type required" % i)
        details.append("%d data source(s)" % len(doc["datasources"] or []))
    elif "providers" in doc:
        for i, p in enumerate(doc["providers"] or []):
            if not isinstance(p, dict) or not is_str(p.get("name")) \
                    or not is_str((p.get("options") or {}).get("path")):
                fail("providers[%d]: name and options.path required" % i)
        details.append("%d dashboard provider(s)" % len(doc["providers"] or []))
    else:
        fail("neither datasources nor providers")

def check_yaml():
    load_yaml_docs(path)
    details.append("parses")

checks = {"k8s": check_k8s, "kustomization": check_kustomization, "json": check_json,
          "prometheus": check_prometheus, "grafana-provisioning": check_grafana_provisioning,
          "yaml": check_yaml}
try:
    checks[mode]()
except (yaml.YAMLError, json.JSONDecodeError, OSError) as e:
    fail("does not parse: %s" % e)

if problems:
    for p in problems:
        print("FAIL %s: %s" % (path, p))
    sys.exit(1)
print("ok   %s: %s" % (path, "; ".join(details) or mode))
PY

valid=0
invalid=0

check() { # MODE FILE
  if "$PYTHON" -c "$CHECKER" "$1" "$2"; then
    valid=$((valid + 1))
  else
    invalid=$((invalid + 1))
  fi
}

while IFS= read -r -d '' file; do
  rel="${file#"$DEPLOY_DIR"/}"
  case "$rel" in
    *.json)
      if "$PYTHON" -m json.tool "$file" >/dev/null 2>&1; then
        check json "$file"
      else
        echo "FAIL $file: not valid JSON: $("$PYTHON" -m json.tool "$file" 2>&1 >/dev/null | tail -1)"
        invalid=$((invalid + 1))
      fi
      ;;
    kubernetes/kustomization.yaml | kubernetes/kustomization.yml)
      check kustomization "$file" ;;
    kubernetes/*.yaml | kubernetes/*.yml)
      check k8s "$file" ;;
    prometheus/*.yaml | prometheus/*.yml)
      check prometheus "$file" ;;
    grafana/provisioning/*.yaml | grafana/provisioning/*.yml)
      check grafana-provisioning "$file" ;;
    *.yaml | *.yml)
      check yaml "$file" ;;
    *) ;; # other files (docs, ...) are not checked
  esac
done < <(find "$DEPLOY_DIR" -type f \( -name '*.yaml' -o -name '*.yml' -o -name '*.json' \) -print0 | sort -z)

total=$((valid + invalid))
if [ "$total" -eq 0 ]; then
  echo "deploy: no files found under $DEPLOY_DIR" >&2
  exit 1
fi
if [ "$invalid" -ne 0 ]; then
  echo "deploy: $invalid of $total files invalid"
  exit 1
fi
echo "deploy: $valid files valid"
