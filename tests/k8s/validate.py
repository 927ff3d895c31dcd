#!/usr/bin/env python3
"""Packaging checks with real tools: the Helm chart rendered and linted by the real Helm
engine (helm-python-sdk bundles Helm's Go SDK), every rendered object and every file in
deploy/, crds/ and examples/ validated against the Kubernetes 1.33 schemas
(kubernetes-validate, strict: unknown fields are errors), SchemaMigration objects against
the generated CRD schema, the Argo CD health check run by a real Lua interpreter, the
Dockerfile linted by hadolint, and the copies that must stay equal compared.

Run by `cargo test --test packaging` (which prepares the Python environment) or directly:
  tests/k8s/validate.py            check everything
  tests/k8s/validate.py --write    regenerate deploy/ and the chart's CRD copy first
"""

import argparse
import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml
from helm_python import _native  # render with api_versions/kube_version (pinned 0.2.2)
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "schemagate"
CRD_FILE = "schemagate.dev_schemamigrations.yaml"
KUBE = "1.33.0"
NAMESPACE = "schemagate-system"
RELEASE = "schemagate"
# Custom resources of other projects the chart may render: validated for shape only.
FOREIGN = {"monitoring.coreos.com/v1", "cert-manager.io/v1", "kustomize.config.k8s.io/v1beta1"}

failures = []


def fail(where, message):
    failures.append(f"{where}: {message}")


# ---------------------------------------------------------------------------------------
# Helm


def deep_merge(base, extra):
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def render(values, api_versions=()):
    """The chart's manifests (CRDs included, as `helm install` applies them) for `values`."""
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(values)
        options = {"name": RELEASE, "namespace": NAMESPACE, "kube_version": KUBE,
                   "api_versions": list(api_versions), "is_install": True}
        raw = _native.call_string("helm_render", chart._raw(), json.dumps(values), json.dumps(options))
        files = json.loads(raw)
        crds = [c["data"] for c in chart.crds]
    docs = []
    for text in crds + [files[k] for k in sorted(files) if not k.endswith("NOTES.txt")]:
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    notes = next((files[k] for k in files if k.endswith("NOTES.txt")), "")
    return docs, notes


def lint(values, label):
    report = helm.lint(str(CHART), values, strict=True, kube_version="v" + KUBE)
    for m in report.get("messages", []):
        if m.get("severity", 0) >= 2:  # warnings and errors
            fail(f"helm lint ({label})", f"{m.get('path')}: {m.get('error')}")


# The documented switches of values.yaml, each rendered, linted and validated.
SWITCHES = {
    "defaults": ({}, ()),
    "watchNamespaces": ({"watchNamespaces": ["team-a", "team-b"]}, ()),
    "webhook disabled": ({"webhook": {"enabled": False}}, ()),
    "cert-manager": ({"webhook": {"certManager": {"enabled": True}}}, ()),
    "cert-manager issuer": ({"webhook": {"certManager": {"enabled": True,
                             "issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"}}}}, ()),
    "serviceMonitor": ({"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}},
                       ("monitoring.coreos.com/v1",)),
    "dashboard and alerts": ({"metrics": {"grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "Platform"}},
                                          "prometheusRule": {"enabled": True, "labels": {"release": "prom"}}}},
                             ("monitoring.coreos.com/v1",)),
    "locally built image (kind, minikube)": ({"image": {"repository": "schemagate", "tag": "dev",
                                                        "pullPolicy": "Never"}}, ()),
    "single replica": ({"replicaCount": 1, "leaderElection": {"enabled": False},
                        "podDisruptionBudget": {"enabled": False}}, ()),
    "image digest, allowed images": ({"image": {"repository": "registry.example/schemagate",
                                                "digest": "sha256:" + "a" * 64},
                                      "allowedImages": ["registry.example/team/*"]}, ()),
    "existing service account": ({"serviceAccount": {"create": False, "name": "ops"}}, ()),
    "failurePolicy Ignore": ({"webhook": {"failurePolicy": "Ignore", "timeoutSeconds": 5,
                                          "excludeNamespaces": ["legacy"]}}, ()),
    "fleets": ({"fleets": {"enabled": True}}, ()),
    "scheduling": ({"nodeSelector": {"kubernetes.io/os": "linux"},
                    "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
                    "priorityClassName": "system-cluster-critical",
                    "podAnnotations": {"a": "b"}, "podLabels": {"team": "platform"},
                    "imagePullSecrets": [{"name": "regcred"}]}, ()),
}

BAD_VALUES = [
    {"replicaCount": 0},
    {"webhook": {"timeoutSeconds": 31}},
    {"webhook": {"failurePolicy": "Sometimes"}},
    {"image": {"repository": "x", "digest": "latest"}},
    {"watchNamespaces": ["Not_A_Namespace"]},
    {"unknownKey": True},
]


def by_kind(docs, kind):
    return [d for d in docs if d.get("kind") == kind]


def one(docs, kind, label):
    found = by_kind(docs, kind)
    if len(found) != 1:
        fail(label, f"expected one {kind}, found {len(found)}")
        return {}
    return found[0]


def args_of(deploy):
    return deploy["spec"]["template"]["spec"]["containers"][0]["args"]


def arg(args, flag):
    for a in args:
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def check_chart_invariants(docs, values, label):
    """What must hold between the rendered objects (names the binary and RBAC agree on)."""
    deploy = one(docs, "Deployment", label)
    if not deploy:
        return
    args = args_of(deploy)
    pod = deploy["spec"]["template"]["spec"]
    container = pod["containers"][0]
    sc = container["securityContext"]
    if not (sc.get("readOnlyRootFilesystem") and sc.get("allowPrivilegeEscalation") is False
            and sc.get("capabilities", {}).get("drop") == ["ALL"] and pod["securityContext"].get("runAsNonRoot")):
        fail(label, "the controller container is not hardened")
    probes = {p: container.get(p, {}).get("httpGet", {}).get("path") for p in ("livenessProbe", "readinessProbe")}
    if probes != {"livenessProbe": "/livez", "readinessProbe": "/readyz"}:
        fail(label, f"probes: {probes}")
    if "requests" not in container.get("resources", {}):
        fail(label, "no resource requests")
    for problem in pss_restricted(pod):
        fail(label, f"controller pod is not Pod Security restricted: {problem}")
    env = {e["name"]: e for e in container.get("env", [])}
    if env.get("SCHEMAGATE_SERVICE_ACCOUNT", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "spec.serviceAccountName":
        fail(label, "the controller does not know its own service account (SCHEMAGATE_SERVICE_ACCOUNT)")
    lease = arg(args, "--leader-election-lease")
    role_rules = [r for role in by_kind(docs, "Role") if role["metadata"]["namespace"] == NAMESPACE
                  for r in role["rules"]]
    if values.get("leaderElection", {}).get("enabled", True):
        if not any(lease in r.get("resourceNames", []) and "update" in r["verbs"] for r in role_rules):
            fail(label, f"no Role lets the controller update its Lease {lease}")
    webhook = values.get("webhook", {})
    mwcs = by_kind(docs, "MutatingWebhookConfiguration")
    if webhook.get("enabled", True):
        if len(mwcs) != 1:
            fail(label, "expected one MutatingWebhookConfiguration")
            return
        mwc = mwcs[0]
        if arg(args, "--webhook-configuration") != mwc["metadata"]["name"]:
            fail(label, "--webhook-configuration does not name the configuration")
        w = mwc["webhooks"][0]
        svc = one(docs, "Service", label)
        ref = w["clientConfig"]["service"]
        if ref["name"] != svc["metadata"]["name"] or ref["name"] != arg(args, "--webhook-service"):
            fail(label, "the webhook's Service, the Service and --webhook-service disagree")
        if ref["port"] not in [p["port"] for p in svc["spec"]["ports"]]:
            fail(label, "the Service has no port the webhook calls")
        if w["objectSelector"] != {"matchExpressions": [{"key": "schemagate.dev/migration", "operator": "Exists"}]}:
            fail(label, f"objectSelector: {w['objectSelector']}")
        excluded = [e for e in w["namespaceSelector"]["matchExpressions"] if e["operator"] == "NotIn"]
        if not excluded or not {"kube-system", NAMESPACE} <= set(excluded[0]["values"]):
            fail(label, "kube-system and the release namespace must be excluded")
        if w["rules"] != [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                           "resources": ["pods"], "scope": "Namespaced"}]:
            fail(label, f"rules: {w['rules']}")
        if not 1 <= w["timeoutSeconds"] <= 30 or w["sideEffects"] != "None":
            fail(label, "timeoutSeconds/sideEffects")
        vwcs = by_kind(docs, "ValidatingWebhookConfiguration")
        if len(vwcs) != 1:
            fail(label, "expected one ValidatingWebhookConfiguration")
            return
        v = vwcs[0]["webhooks"][0]
        if vwcs[0]["metadata"]["name"] != mwc["metadata"]["name"]:
            fail(label, "both webhook configurations must carry --webhook-configuration's name")
        if v["clientConfig"]["service"]["name"] != ref["name"] or v["clientConfig"]["service"]["path"] != "/validate":
            fail(label, "the validating webhook does not call the Service at /validate")
        if v["failurePolicy"] != "Fail" or v["rules"] != [{
                "apiGroups": ["schemagate.dev"], "apiVersions": ["*"], "operations": ["CREATE", "UPDATE"],
                "resources": ["schemamigrations"], "scope": "Namespaced"}]:
            fail(label, f"validating webhook: {v}")
        sar = [r for cr in by_kind(docs, "ClusterRole") for r in cr["rules"]
               if "subjectaccessreviews" in r.get("resources", [])]
        if not sar or sar[0]["verbs"] != ["create"]:
            fail(label, "the controller cannot create SubjectAccessReviews")
        cert_manager = webhook.get("certManager", {}).get("enabled", False)
        if cert_manager:
            certs = by_kind(docs, "Certificate")
            injects = {c["metadata"].get("annotations", {}).get("cert-manager.io/inject-ca-from", "")
                       for c in (mwc, vwcs[0])}
            if not certs or injects != {f"{NAMESPACE}/{certs[0]['metadata']['name']}"}:
                fail(label, "cert-manager CA injection does not point at the Certificate")
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            if arg(args, "--webhook-cert-dir") != "/tls" or volumes.get("tls", {}).get("secret", {}).get("secretName") != certs[0]["spec"]["secretName"]:
                fail(label, "the certificate Secret is not mounted where --webhook-cert-dir points")
        else:
            secret = arg(args, "--webhook-secret")
            if not any(secret in r.get("resourceNames", []) and "update" in r["verbs"] for r in role_rules):
                fail(label, f"no Role lets the controller update its certificate Secret {secret}")
            patchers = [r for cr in by_kind(docs, "ClusterRole") for r in cr["rules"]
                        if "mutatingwebhookconfigurations" in r.get("resources", [])]
            if not patchers or patchers[0].get("resourceNames") != [mwc["metadata"]["name"]] \
                    or "validatingwebhookconfigurations" not in patchers[0]["resources"]:
                fail(label, "the controller must be able to patch exactly its own webhook configurations")
    elif mwcs or by_kind(docs, "ValidatingWebhookConfiguration") or arg(args, "--webhook") != "false":
        fail(label, "webhook disabled but still configured")
    # Secrets: get only, never list or watch; list only for fleets (fleets.enabled).
    allowed = {"get", "create", "update"} | ({"list"} if values.get("fleets", {}).get("enabled") else set())
    for role in by_kind(docs, "ClusterRole") + by_kind(docs, "Role"):
        for r in role["rules"]:
            if "secrets" in r.get("resources", []) and set(r["verbs"]) - allowed:
                fail(label, f"{role['kind']} {role['metadata']['name']} grants {r['verbs']} on secrets")
            if "secrets" in r.get("resources", []) and set(r["verbs"]) & {"create", "update"} \
                    and role["kind"] == "ClusterRole":
                fail(label, "Secret writes must stay in the release namespace")
            # The only deletion: superseded inline-source ConfigMaps (never a collection).
            if "deletecollection" in r["verbs"] or "*" in r["verbs"] or (
                    "delete" in r["verbs"] and r.get("resources") != ["configmaps"]):
                fail(label, f"{role['kind']} {role['metadata']['name']} may delete {r.get('resources')}")
    watch = values.get("watchNamespaces", [])
    if watch:
        if by_kind(docs, "ClusterRoleBinding") and any(
                crb["roleRef"]["name"] == deploy["metadata"]["name"] for crb in by_kind(docs, "ClusterRoleBinding")):
            fail(label, "a namespace list must not bind the namespaced rules cluster-wide")
        bound = {rb["metadata"]["namespace"] for rb in by_kind(docs, "RoleBinding")}
        if not set(watch) <= bound:
            fail(label, f"RoleBindings missing in {set(watch) - bound}")
        if sorted(a.split("=", 1)[1] for a in args if a.startswith("--watch-namespace=")) != sorted(watch):
            fail(label, "--watch-namespace flags do not match watchNamespaces")


def pss_restricted(pod):
    """The Pod Security Standards' restricted profile (with baseline), for a pod spec."""
    out = []
    psc = pod.get("securityContext", {})
    for f in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(f):
            out.append(f"{f} is set")
    allowed_volumes = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                       "persistentVolumeClaim", "projected", "secret"}
    for v in pod.get("volumes", []):
        if not (set(v) - {"name"}) <= allowed_volumes:
            out.append(f"volume {v['name']} has a forbidden type")
    if psc.get("runAsUser") == 0:
        out.append("pod runAsUser 0")
    for c in pod.get("initContainers", []) + pod.get("containers", []):
        sc = c.get("securityContext", {})
        at = f"container {c['name']}"
        if sc.get("privileged"):
            out.append(f"{at}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{at}: allowPrivilegeEscalation must be false")
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            out.append(f"{at}: runAsNonRoot must be true")
        if sc.get("runAsUser") == 0:
            out.append(f"{at}: runAsUser 0")
        seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{at}: seccompProfile must be RuntimeDefault or Localhost")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            out.append(f"{at}: capabilities must drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{at}: adds capabilities")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            out.append(f"{at}: hostPort")
    return out


def check_chart():
    base = yaml.safe_load((CHART / "values.yaml").read_text())
    rendered = {}
    for label, (extra, apis) in SWITCHES.items():
        values = deep_merge(base, extra)
        lint(extra, label)
        try:
            docs, notes = render(values, apis)
        except helm.HelmError as e:
            fail(f"helm template ({label})", str(e))
            continue
        if "schemagate.dev/migration" not in notes:
            fail(f"NOTES.txt ({label})", "does not tell how to gate a pod")
        validate_docs(docs, f"chart[{label}]")
        check_chart_invariants(docs, extra, f"chart[{label}]")
        rendered[label] = docs
    for bad in BAD_VALUES:
        try:
            render(deep_merge(base, bad))
            fail("values.schema.json", f"accepted {bad}")
        except helm.HelmError:
            pass
    try:
        render(deep_merge(base, {"metrics": {"serviceMonitor": {"enabled": True}}}))
        fail("chart", "a ServiceMonitor without the Prometheus Operator API must be refused")
    except helm.HelmError as e:
        if "monitoring.coreos.com" not in str(e):
            fail("chart", f"unclear ServiceMonitor error: {e}")
    try:
        render(deep_merge(base, {"metrics": {"prometheusRule": {"enabled": True}}}))
        fail("chart", "a PrometheusRule without the Prometheus Operator API must be refused")
    except helm.HelmError as e:
        if "monitoring.coreos.com" not in str(e):
            fail("chart", f"unclear PrometheusRule error: {e}")
    check_observability(rendered.get("dashboard and alerts", []))
    # Every value is documented in the chart README.
    readme = (CHART / "README.md").read_text()
    for path in leaf_paths(base):
        if f"`{path}`" not in readme:
            fail("charts/schemagate/README.md", f"value `{path}` is not documented")
    return rendered


def check_observability(docs):
    """The dashboard ConfigMap carries the sidecar label and parseable JSON; the rules are
    well-formed. tests/observability.rs checks their metric names against /metrics."""
    cms = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    if len(cms) != 1:
        fail("dashboard", f"expected one dashboard ConfigMap, found {len(cms)}")
    for cm in cms:
        if cm["metadata"].get("labels", {}).get("grafana_dashboard") != "1":
            fail("dashboard", "the ConfigMap lacks the grafana_dashboard sidecar label")
        try:
            dash = json.loads(cm["data"]["schemagate.json"])
            if not dash.get("panels"):
                fail("dashboard", "no panels")
        except (KeyError, ValueError) as e:
            fail("dashboard", f"the ConfigMap's JSON does not parse: {e}")
    rules = by_kind(docs, "PrometheusRule")
    if len(rules) != 1:
        fail("PrometheusRule", f"expected one, found {len(rules)}")
    for r in rules:
        for g in r["spec"]["groups"]:
            for rule in g["rules"]:
                if not rule.get("alert") or not rule.get("expr") or "severity" not in rule.get("labels", {}):
                    fail("PrometheusRule", f"incomplete rule {rule}")
                if "{{ $labels" in str(rule.get("annotations")) and "{{" not in rule["annotations"]["summary"]:
                    fail("PrometheusRule", "broken template escaping")


def leaf_paths(values, prefix=""):
    for k, v in values.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v and k not in ("resources",):
            yield from leaf_paths(v, path + ".")
        else:
            yield path


# ---------------------------------------------------------------------------------------
# Kubernetes schemas


def load_crd():
    crd = yaml.safe_load((ROOT / "crds" / CRD_FILE).read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return crd, jsonschema.Draft4Validator(strictify(schema, root=True))


def strictify(s, root=False):
    """OpenAPI v3 (structural) -> JSON Schema draft 4 that also rejects unknown fields."""
    s = copy.deepcopy(s)
    if s.get("nullable"):
        t = s.get("type")
        if t:
            s["type"] = [t, "null"]
    if s.get("x-kubernetes-int-or-string"):
        s.pop("type", None)
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    props = s.get("properties")
    if props is not None:
        if root or s.get("x-kubernetes-embedded-resource"):
            props.setdefault("apiVersion", {"type": "string"})
            props.setdefault("kind", {"type": "string"})
            props.setdefault("metadata", {"type": "object"})
        for k in list(props):
            props[k] = strictify(props[k])
        if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = strictify(s["additionalProperties"])
    if isinstance(s.get("items"), dict):
        s["items"] = strictify(s["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in s:
            s[key] = [strictify(x) for x in s[key]]
    return s


CRD, CR_VALIDATOR = None, None


def validate_docs(docs, where):
    for i, doc in enumerate(docs):
        name = f"{where} #{i} {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        api = doc.get("apiVersion", "")
        if api == "schemagate.dev/v1alpha1" and doc.get("kind") == "SchemaMigration":
            for e in CR_VALIDATOR.iter_errors(doc):
                fail(name, f"{'.'.join(map(str, e.path))}: {e.message}")
            continue
        try:
            kubernetes_validate.validate(doc, KUBE, strict=True)
        except ValidationError as e:
            fail(name, f"{'.'.join(map(str, e.path))}: {e.message}")
        except SchemaNotFoundError as e:
            if api not in FOREIGN:
                fail(name, f"no Kubernetes schema: {e.message}")
            elif not isinstance(doc.get("spec", doc.get("resources")), (dict, list)):
                fail(name, "a foreign resource without a spec")


def check_files():
    for sub in ("deploy", "crds", "examples"):
        for path in sorted((ROOT / sub).rglob("*.y*ml")):
            try:
                docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
            except yaml.YAMLError as e:
                fail(str(path.relative_to(ROOT)), f"not YAML: {e}")
                continue
            if not docs:
                fail(str(path.relative_to(ROOT)), "no objects")
            validate_docs(docs, str(path.relative_to(ROOT)))


def check_copies(default_docs, write):
    """The chart's CRD and deploy/ are generated; they must equal their sources."""
    crd_text = (ROOT / "crds" / CRD_FILE).read_text()
    copies = {CHART / "crds" / CRD_FILE: crd_text, ROOT / "deploy" / CRD_FILE: crd_text}
    body = [d for d in default_docs if d.get("kind") != "CustomResourceDefinition"]
    # The controller passes the restricted Pod Security Standard: enforce it there.
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE, "labels": {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest",
        "pod-security.kubernetes.io/warn": "restricted",
    }}}
    header = ("# Generated from charts/schemagate with default values (release schemagate, namespace\n"
              f"# {NAMESPACE}) by tests/k8s/validate.py --write; do not edit. A test fails when it is stale.\n")
    copies[ROOT / "deploy" / "schemagate.yaml"] = header + yaml.safe_dump_all(
        [ns] + body, sort_keys=False, default_flow_style=False)
    copies[ROOT / "deploy" / "kustomization.yaml"] = (
        "# kubectl apply -k deploy/  (the chart's default rendering, CRD included)\n"
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {CRD_FILE}\n  - schemagate.yaml\n")
    for path, want in copies.items():
        if write:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(want)
        elif not path.exists() or path.read_text() != want:
            fail(str(path.relative_to(ROOT)), "stale: run tests/k8s/validate.py --write")


# ---------------------------------------------------------------------------------------
# Docs, examples, Argo CD, Dockerfile


def spec_paths(schema, prefix, depth):
    for k, v in schema.get("properties", {}).items():
        yield prefix + k
        if depth > 0 and "properties" in v:
            yield from spec_paths(v, prefix + k + ".", depth - 1)


def check_readme_reference():
    readme = (ROOT / "README.md").read_text()
    start = readme.find("### Resource reference")
    end = readme.find("\n### ", start + 1)
    section = readme[start:end] if start >= 0 else ""
    if not section:
        fail("README.md", "no '### Resource reference' section")
        return
    schema = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec = schema["properties"]["spec"]
    for path in spec_paths(spec, "", 1):
        leaf = path.split(".")[-1]
        if f"`spec.{path}`" not in section and f"`{leaf}`" not in section:
            fail("README.md resource reference", f"spec.{path} is not described")
    for path in spec_paths(schema["properties"]["status"], "", 0):
        if f"`{path}`" not in section:
            fail("README.md resource reference", f"status.{path} is not described")
    # Every condition reason of the code is listed.
    reasons = re.findall(r'pub const \w+: &str = "(\w+)";',
                         (ROOT / "src" / "api" / "conditions.rs").read_text().split("pub mod reason")[1])
    for r in reasons:
        if f"`{r}`" not in readme:
            fail("README.md", f"condition reason {r} is not listed")


def check_examples():
    files = {p.name: p.read_text() for p in (ROOT / "examples" / "migrations").glob("*.sql")}
    for name in ("app-initcontainer.yaml", "app-job.yaml"):
        docs = [d for d in yaml.safe_load_all((ROOT / "examples" / name).read_text()) if d]
        cm = next(d for d in docs if d["kind"] == "ConfigMap")
        if cm["data"] != files:
            fail(f"examples/{name}", "the ConfigMap differs from examples/migrations")
        sm = next(d for d in docs if d["kind"] == "SchemaMigration")
        dep = next(d for d in docs if d["kind"] == "Deployment")
        label = dep["spec"]["template"]["metadata"]["labels"].get("schemagate.dev/migration")
        if label != sm["metadata"]["name"]:
            fail(f"examples/{name}", "the Deployment is not gated by the SchemaMigration")
        secret = next(d for d in docs if d["kind"] == "Secret")
        if sm["spec"]["database"]["urlSecretRef"]["name"] != secret["metadata"]["name"]:
            fail(f"examples/{name}", "the SchemaMigration names another Secret")
        versions = sorted(n.split("_")[0] for n in files)
        if sm["spec"]["targetVersion"] != versions[-1]:
            fail(f"examples/{name}", "targetVersion is not the newest migration")
    lua = (ROOT / "examples" / "argocd" / "schemagate-health.lua").read_text()
    cm = yaml.safe_load((ROOT / "examples" / "argocd" / "argocd-cm.yaml").read_text())
    if cm["data"]["resource.customizations.health.schemagate.dev_SchemaMigration"].strip() != lua.strip():
        fail("examples/argocd/argocd-cm.yaml", "differs from schemagate-health.lua")
    check_lua(lua)


def check_lua(lua):
    """Runs the health check in a real Lua interpreter against statuses the controller writes."""
    import lupa

    def cond(t, status, reason, message="m"):
        return {"type": t, "status": status, "reason": reason, "message": message}

    def obj(gen, observed, conditions):
        o = {"metadata": {"generation": gen}}
        if observed is not None:
            o["status"] = {"observedGeneration": observed, "conditions": conditions}
        return o

    cases = [
        (obj(1, None, []), "Progressing"),
        (obj(2, 1, [cond("Ready", "True", "UpToDate")]), "Progressing"),
        (obj(1, 1, [cond("Ready", "True", "UpToDate"), cond("Stalled", "False", "UpToDate")]), "Healthy"),
        (obj(1, 1, [cond("Ready", "False", "DowngradeDenied"), cond("Stalled", "True", "DowngradeDenied", "set downgrade: Allow")]), "Degraded"),
        (obj(1, 1, [cond("Ready", "False", "Paused"), cond("Stalled", "False", "Paused"), cond("Reconciling", "False", "Paused")]), "Suspended"),
        (obj(1, 1, [cond("Ready", "False", "JobRunning"), cond("Reconciling", "True", "JobRunning")]), "Progressing"),
    ]
    rt = lupa.LuaRuntime(unpack_returned_tuples=True)
    fn = rt.eval("function(obj) " + lua + " end")
    for o, want in cases:
        got = fn(rt.table_from(json_to_lua(rt, o)))
        status = got["status"]
        if status != want:
            fail("argocd health check", f"{json.dumps(o)} -> {status}, want {want}")
        if want == "Degraded" and "DowngradeDenied" not in got["message"]:
            fail("argocd health check", f"Degraded without the reason: {got['message']}")


def json_to_lua(rt, v):
    if isinstance(v, dict):
        return {k: (rt.table_from(json_to_lua(rt, x)) if isinstance(x, (dict, list)) else x) for k, x in v.items()}
    if isinstance(v, list):
        return [rt.table_from(json_to_lua(rt, x)) if isinstance(x, (dict, list)) else x for x in v]
    return v


def check_dockerfile():
    hadolint = Path(sys.executable).parent / "hadolint"
    out = subprocess.run([str(hadolint), "--no-color", "--failure-threshold", "warning",
                          str(ROOT / "Dockerfile")], capture_output=True, text=True)
    if out.returncode != 0:
        fail("Dockerfile (hadolint)", out.stdout + out.stderr)
    text = (ROOT / "Dockerfile").read_text()
    ignore = (ROOT / ".dockerignore").read_text()
    for src in re.findall(r"^COPY (?!--from)(.+?) \S+$", text, re.M):
        for item in src.split():
            if not (ROOT / item).exists():
                fail("Dockerfile", f"COPY {item}: no such path")
            if f"!{item.rstrip('/')}" not in ignore and f"!{item}" not in ignore:
                fail(".dockerignore", f"{item} is copied but ignored")
    if "USER 65532" not in text or "distroless/static" not in text:
        fail("Dockerfile", "the final image must be distroless static and non-root")


def main():
    global CRD, CR_VALIDATOR
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="regenerate deploy/ and the chart's CRD copy")
    args = ap.parse_args()
    CRD, CR_VALIDATOR = load_crd()
    rendered = check_chart()
    if "defaults" in rendered:
        check_copies(rendered["defaults"], args.write)
    check_files()
    check_readme_reference()
    check_examples()
    check_dockerfile()
    if failures:
        print(f"{len(failures)} problem(s):")
        for f in failures:
            print("  - " + f)
        sys.exit(1)
    print(f"ok: chart rendered and linted with {len(SWITCHES)} value sets, "
          "deploy/, crds/, examples/ valid for Kubernetes " + KUBE + ", Dockerfile linted")


if __name__ == "__main__":
    main()
