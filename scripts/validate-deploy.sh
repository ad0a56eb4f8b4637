#!/usr/bin/env bash
# Validates the deployment files under deploy/ without a cluster or a container engine:
#
#   deploy/kubernetes*/*.yaml  Kubernetes objects against the API schemas shipped by the PyPI
#                              package kubernetes-validate (strict: unknown fields are errors).
#                              KEDA's ScaledObject and TriggerAuthentication are custom
#                              resources it has no schema for (it only warns and passes them),
#                              so they get a structural check here instead. So does the
#                              RabbitMQ Cluster Operator's RabbitmqCluster: a JSON schema of its
#                              spec below, whose Kubernetes types (resources, affinity, ...) are
#                              checked against kubernetes-validate's own definitions.
#   kustomization.yaml         lists every manifest (not the *.example.yaml ones), all existing;
#                              an overlay's bases (directories) are built with it and its JSON
#                              patches applied, and every patched object is validated again.
#                              In the result: no $(VAR) in an env value before VAR is defined
#                              (Kubernetes would leave it as text), not both LLMQ_AMQP__URL and
#                              LLMQ_AMQP__URLS, and URLs naming a RabbitmqCluster's pods name
#                              each of its replicas.
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
import copy, json, os, re, sys
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

# --- RabbitMQ Cluster Operator (no schema in kubernetes-validate) --------------------------
# The fields of RabbitmqCluster (rabbitmq.com/v1beta1) as the operator's CRD gives them
# (github.com/rabbitmq/cluster-operator, api/v1beta1/rabbitmqcluster_types.go), unknown ones
# refused. Fields of Kubernetes types refer to kubernetes-validate's strict definitions;
# override.* is free-form here (the operator merges it into its StatefulSet and Service).
RMQ_API = "rabbitmq.com/v1beta1"

def k8s_def(name):
    return {"$ref": "/api/_definitions.json#/$defs/" + name}

def closed(props, required=()):
    return {"type": "object", "additionalProperties": False, "properties": props,
            "required": list(required)}

STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
QUANTITY = {"anyOf": [{"type": "integer", "minimum": 0}, {
    "type": "string",
    "pattern": r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E|e[0-9]+)?$"}]}
RMQ_CLUSTER_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://kubernetes.io/api/rabbitmqcluster/rabbitmq.com/v1beta1",
    **closed({
        "apiVersion": {"const": RMQ_API},
        "kind": {"const": "RabbitmqCluster"},
        "metadata": k8s_def("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"),
        "spec": closed({
            "replicas": {"type": "integer", "minimum": 0},
            "image": {"type": "string", "minLength": 1},
            "imagePullSecrets": {"type": "array",
                                 "items": k8s_def("io.k8s.api.core.v1.LocalObjectReference")},
            "service": closed({
                "type": {"enum": ["ClusterIP", "LoadBalancer", "NodePort"]},
                "annotations": STRING_MAP, "labels": STRING_MAP,
                "ipFamilyPolicy": {"enum": ["SingleStack", "PreferDualStack",
                                            "RequireDualStack"]}}),
            "persistence": closed({
                "storageClassName": {"type": "string"},
                "storage": QUANTITY,
                "emptyDir": closed({"medium": {"type": "string"}, "sizeLimit": QUANTITY})}),
            "resources": k8s_def("io.k8s.api.core.v1.ResourceRequirements"),
            "affinity": k8s_def("io.k8s.api.core.v1.Affinity"),
            "tolerations": {"type": "array", "items": k8s_def("io.k8s.api.core.v1.Toleration")},
            "rabbitmq": closed({
                "additionalPlugins": {"type": "array", "maxItems": 100,
                                      "items": {"type": "string", "pattern": r"^\w+$",
                                                "maxLength": 100}},
                "additionalConfig": {"type": "string", "maxLength": 100000},
                "advancedConfig": {"type": "string", "maxLength": 100000},
                "envConfig": {"type": "string", "maxLength": 100000},
                "erlangInetConfig": {"type": "string", "maxLength": 2000}}),
            "tls": closed({"secretName": {"type": "string"}, "caSecretName": {"type": "string"},
                           "disableNonTLSListeners": {"type": "boolean"}}),
            "override": closed({"statefulSet": {"type": "object"},
                                "service": {"type": "object"}}),
            "skipPostDeploySteps": {"type": "boolean"},
            "autoEnableAllFeatureFlags": {"type": "boolean"},
            "terminationGracePeriodSeconds": {"type": "integer", "minimum": 0},
            "delayStartSeconds": {"type": "integer", "minimum": 0},
            "secretBackend": {"type": "object"}}),
        "status": {"type": "object"}},
        required=("apiVersion", "kind", "metadata", "spec")),
}

def k8s_version():
    import kubernetes_validate.utils as kv
    wanted = os.environ.get("K8S_VERSION") or kv.latest_version()
    # The newest schemas not newer than the version asked for, as kubernetes-validate picks.
    return [v for v in kv.all_versions() if kv.major_minor(v) <= kv.major_minor(wanted)][-1]

def check_rabbitmq_cluster(doc, where):
    import jsonschema
    import kubernetes_validate.utils as kv
    from referencing import Registry, Resource
    version = k8s_version()
    defs = kv.schema_contents("kubernetes-json-schema/v%s-local-strict/_definitions.json"
                              % version, version)
    registry = Resource.from_contents(defs) @ Registry()
    validator = jsonschema.Draft202012Validator(RMQ_CLUSTER_SCHEMA, registry=registry)
    for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
        fail("%s: %s: %s" % (where, ".".join(str(p) for p in e.absolute_path) or "(root)",
                             e.message))
    spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
    replicas = spec.get("replicas", 1)
    if isinstance(replicas, int) and replicas % 2 == 0:
        fail("%s: spec.replicas %d: quorum queues need a majority, keep the count odd"
             % (where, replicas))
    conf = (spec.get("rabbitmq") or {}).get("additionalConfig")
    if isinstance(conf, str):
        # rabbitmq.conf is "key = value" lines; anything else stops the node at boot.
        for n, line in enumerate(conf.splitlines(), 1):
            line = line.strip()
            if line and not line.startswith("#") \
                    and not re.match(r"^[A-Za-z0-9_.$-]+\s*=\s*\S", line):
                fail("%s: spec.rabbitmq.additionalConfig line %d is not 'key = value': %r"
                     % (where, n, line))

def check_object(doc, where, auth_names):
    """Validates one object by the check its kind has; returns what was checked."""
    import kubernetes_validate.utils as kv
    version = os.environ.get("K8S_VERSION") or kv.latest_version()
    if doc["apiVersion"].startswith("keda.sh/"):
        check_keda(doc, where, auth_names)
        return "%s (KEDA, structural)" % where
    if doc["apiVersion"].startswith("rabbitmq.com/"):
        if doc["kind"] != "RabbitmqCluster" or doc["apiVersion"] != RMQ_API:
            fail("%s: no check for %s %s" % (where, doc["apiVersion"], doc["kind"]))
            return where
        check_rabbitmq_cluster(doc, where)
        return "%s (RabbitMQ operator, schema of its spec)" % where
    try:
        got = kv.validate(doc, version, strict=True)
        return "%s (k8s %s schema, strict)" % (where, got)
    except kv.ValidationError as e:
        fail("%s: %s: %s" % (where, ".".join(str(p) for p in e.path) or "(root)", e.message))
    except kv.SchemaNotFoundError as e:
        fail("%s: %s" % (where, e.message))
    except kv.VersionNotSupportedError as e:
        fail(e.message)
    return where

def auth_names_of(docs):
    return {d.get("metadata", {}).get("name") for d in docs
            if isinstance(d, dict) and d.get("kind") == "TriggerAuthentication"}

def check_k8s():
    docs = load_yaml_docs(path)
    if not docs:
        fail("no Kubernetes object in the file")
    auth_names = auth_names_of(docs)
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict) or not is_str(doc.get("apiVersion")) \
                or not is_str(doc.get("kind")):
            fail("document %d: not a Kubernetes object (apiVersion and kind)" % (i + 1))
            continue
        details.append(check_object(doc, kn(doc), auth_names))

# --- kustomize: bases, JSON patches, and what the built objects must agree on -------------
KUSTOMIZATIONS = ("kustomization.yaml", "kustomization.yml")

def load_kustomization(d):
    for name in KUSTOMIZATIONS:
        if os.path.isfile(os.path.join(d, name)):
            docs = load_yaml_docs(os.path.join(d, name))
            return docs[0] if len(docs) == 1 and isinstance(docs[0], dict) else {}
    return None

def json_pointer(doc, pointer):
    """The container and the key or index that an RFC 6901 pointer names in doc."""
    parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]
    if not parts:
        raise ValueError("empty path")
    node = doc
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    last = parts[-1]
    if isinstance(node, list):
        return node, (len(node) if last == "-" else int(last))
    return node, last

def apply_json6902(doc, ops, where):
    """Applies the RFC 6902 operations kustomize applies (add, remove, replace, test)."""
    for i, op in enumerate(ops):
        ow = "%s: op %d (%s %s)" % (where, i + 1, op.get("op"), op.get("path"))
        try:
            parent, key = json_pointer(doc, op["path"])
            kind = op["op"]
            if kind == "test":
                if parent[key] != op["value"]:
                    fail("%s: found %r" % (ow, parent[key]))
                    return False
            elif kind == "remove":
                del parent[key]
            elif kind == "replace":
                parent[key]  # must exist
                parent[key] = copy.deepcopy(op["value"])
            elif kind == "add":
                if isinstance(parent, list):
                    parent.insert(key, copy.deepcopy(op["value"]))
                else:
                    parent[key] = copy.deepcopy(op["value"])
            else:
                fail("%s: this validator does not apply %r operations" % (ow, kind))
                return False
        except (KeyError, IndexError, ValueError, TypeError) as e:
            fail("%s: does not apply: %s" % (ow, e))
            return False
    return True

def matches(target, doc):
    meta = doc.get("metadata") or {}
    api = doc.get("apiVersion", "")
    group, _, version = api.rpartition("/")
    return all(target.get(k) in (None, v) for k, v in (
        ("kind", doc.get("kind")), ("name", meta.get("name")), ("group", group),
        ("version", version), ("namespace", meta.get("namespace"))))

def build(d, stack, patched):
    """The objects kustomization d yields, with its bases built and its patches applied;
    adds the id() of each object a patch changed to patched."""
    k = load_kustomization(d)
    if k is None:
        fail("%s has no kustomization.yaml" % d)
        return []
    where = os.path.normpath(os.path.join(d, "kustomization.yaml"))
    if k.get("apiVersion") != "kustomize.config.k8s.io/v1beta1" \
            or k.get("kind") != "Kustomization":
        fail("%s: want apiVersion kustomize.config.k8s.io/v1beta1, kind Kustomization" % where)
    resources = k.get("resources")
    if not isinstance(resources, list) or not resources:
        fail("%s: resources must be a non-empty list" % where)
        return []
    objs = []
    for r in resources:
        rp = os.path.normpath(os.path.join(d, r))
        if ".example." in r:
            fail("%s: resource %s is an example and must not be applied" % (where, r))
        elif os.path.isdir(rp):
            # kustomize refuses a base that contains its overlay (or the reverse).
            if any(rp == s or rp.startswith(s + os.sep) or s.startswith(rp + os.sep)
                   for s in stack + [os.path.normpath(d)]):
                fail("%s: base %s contains this kustomization or is inside it" % (where, r))
            else:
                objs.extend(build(rp, stack + [os.path.normpath(d)], patched))
        elif os.path.isfile(rp):
            objs.extend(copy.deepcopy(load_yaml_docs(rp)))
        else:
            fail("%s: resource %s does not exist" % (where, r))
    for i, patch in enumerate(k.get("patches") or []):
        pw = "%s: patches[%d]" % (where, i)
        target = patch.get("target") if isinstance(patch, dict) else None
        ops = yaml.safe_load(patch.get("patch", "")) if isinstance(patch, dict) else None
        if not isinstance(target, dict) or not isinstance(ops, list):
            fail("%s: only inline JSON 6902 patches (target + patch: a list of operations) "
                 "are checked here" % pw)
            continue
        hit = [o for o in objs if isinstance(o, dict) and matches(target, o)]
        if not hit:
            fail("%s: target %s matches no object" % (pw, target))
        for o in hit:
            if apply_json6902(o, ops, "%s %s" % (pw, kn(o))):
                patched.add(id(o))
    ns = k.get("namespace")
    for o in objs:
        if ns and isinstance(o, dict) and o.get("kind") != "Namespace":
            o.setdefault("metadata", {})["namespace"] = ns
    return objs

def check_env(objs):
    """What Kubernetes and the worker would only reveal once running."""
    clusters = {}
    for o in objs:
        if o.get("kind") == "RabbitmqCluster":
            m = o.get("metadata") or {}
            spec = o.get("spec") or {}
            clusters[(m.get("name"), m.get("namespace"))] = spec.get("replicas", 1)
    for o in objs:
        pod = ((o.get("spec") or {}).get("template") or {}).get("spec") or {}
        for c in (pod.get("containers") or []) + (pod.get("initContainers") or []):
            where = "%s container %s" % (kn(o), c.get("name"))
            defined = set()
            env = c.get("env") or []
            names = [e.get("name") for e in env]
            if "LLMQ_AMQP__URL" in names and "LLMQ_AMQP__URLS" in names:
                fail("%s: both LLMQ_AMQP__URL and LLMQ_AMQP__URLS (the worker refuses to "
                     "start with both)" % where)
            for e in env:
                for ref in sorted(set(re.findall(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                                                 str(e.get("value", ""))))):
                    if ref not in defined:
                        fail("%s: %s refers to $(%s) before it is defined: Kubernetes "
                             "leaves it as text" % (where, e.get("name"), ref))
                defined.add(e.get("name"))
                if e.get("name") != "LLMQ_AMQP__URLS" or "value" not in e:
                    continue
                hosts = re.findall(r"amqps?://(?:[^@\s,\]]*@)?([^:/\s,\]]+)", e["value"])
                for (name, namespace), replicas in clusters.items():
                    sub = ".%s-nodes.%s.svc" % (name, namespace)
                    if not any(h.endswith(sub) for h in hosts):
                        continue
                    want = sorted("%s-server-%d%s" % (name, i, sub) for i in range(replicas))
                    if sorted(h for h in hosts if h.endswith(sub)) != want:
                        fail("%s: LLMQ_AMQP__URLS names pods of RabbitmqCluster %s but not "
                             "exactly its %d replicas %s" % (where, name, replicas, want))

def check_kustomization():
    here = os.path.dirname(path)
    patched_ids = set()
    objs = [o for o in build(here, [], patched_ids) if isinstance(o, dict)]
    k = load_kustomization(here) or {}
    resources = k.get("resources") if isinstance(k.get("resources"), list) else []
    listed = {os.path.normpath(r) for r in resources}
    for name in sorted(os.listdir(here)):
        if name.endswith((".yaml", ".yml")) and ".example." not in name \
                and name not in KUSTOMIZATIONS and name not in listed:
            fail("%s is not listed in resources" % name)
    # A patch can break what its file alone passed: check the patched objects again.
    patched = [o for o in objs if id(o) in patched_ids]
    for o in patched:
        check_object(o, "%s once patched" % kn(o), auth_names_of(objs))
    check_env(objs)
    details.append("%d resources, %d objects built, %d patched and valid"
                   % (len(resources), len(objs), len(patched)))

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
    kubernetes*/kustomization.yaml | kubernetes*/kustomization.yml)
      check kustomization "$file" ;;
    kubernetes*/*.yaml | kubernetes*/*.yml)
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
