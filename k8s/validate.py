"""Offline validation of the mar3d Kubernetes manifests (no cluster, no kustomize binary).

    python k8s/validate.py            # validates k8s/base and every overlay; exit 1 on errors

Three layers, each reporting every problem it finds (nothing is skipped silently):

1. Schema. KubeRay RayCluster/RayJob against ``schemas/kuberay-v1.schema.json`` (JSON
   Schema written from the KubeRay ray.io/v1 API types, unknown fields rejected). Core
   kinds, and the core types embedded in the Ray CRDs (pod templates, services, ...), are
   checked against the Kubernetes OpenAPI models shipped in the ``kubernetes`` Python
   client: every field must exist in the model, have the model's type, and required
   fields must be present.
2. Policy. Every container has cpu+memory requests and limits (plus a GPU limit in GPU
   worker groups), runs as non-root without privilege escalation, and gets secrets only
   through ``secretKeyRef``/``secretRef``; no Secret objects are committed; RayJobs clean
   up after themselves; the pipeline's Role grants exactly what it needs on RayJobs.
3. Kustomize. ``render()`` builds a kustomization the way ``kustomize build`` would for
   the features used here (resources, namespace, labels, images, JSON6902 patches with
   name/kind/labelSelector targets), so each overlay's *output* is validated too.
"""
from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterable

import jsonschema
import yaml

K8S_DIR = Path(__file__).resolve().parent
SCHEMA_PATH = K8S_DIR / "schemas" / "kuberay-v1.schema.json"
OVERLAYS = ("local", "dev", "prod")

# kind -> (apiVersion, kubernetes client model) for the core kinds used here.
CORE_KINDS = {
    "Namespace": ("v1", "V1Namespace"),
    "ServiceAccount": ("v1", "V1ServiceAccount"),
    "ConfigMap": ("v1", "V1ConfigMap"),
    "PersistentVolumeClaim": ("v1", "V1PersistentVolumeClaim"),
    "Service": ("v1", "V1Service"),
    "Deployment": ("apps/v1", "V1Deployment"),
    "Role": ("rbac.authorization.k8s.io/v1", "V1Role"),
    "RoleBinding": ("rbac.authorization.k8s.io/v1", "V1RoleBinding"),
    "NetworkPolicy": ("networking.k8s.io/v1", "V1NetworkPolicy"),
}
RAY_KINDS = {"RayCluster", "RayJob"}
KNOWN_KINDS = set(CORE_KINDS) | RAY_KINDS

PIPELINE_SERVICE_ACCOUNT = "mar3d-pipeline"
PIPELINE_RULES = [  # exactly what the pipeline may do; anything more is a finding
    {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list", "watch"]},
    {"apiGroups": ["ray.io"], "resources": ["rayjobs/status"], "verbs": ["get"]},
]
GPU_RESOURCE = "nvidia.com/gpu"


# --------------------------------------------------------------------------- schema

def _model(name: str):
    import kubernetes.client as client

    cls = getattr(client, name, None)
    if cls is None or not hasattr(cls, "openapi_types"):
        raise KeyError(f"no Kubernetes model named {name}")
    return cls


_LIST = re.compile(r"^list\[(.+)\]$")
_DICT = re.compile(r"^dict\(str, (.+)\)$")


def check_core_type(value: Any, type_name: str, where: str) -> list[str]:
    """Errors in ``value`` against a Kubernetes client model type such as ``V1PodSpec``.

    The models carry the Kubernetes OpenAPI field names (``attribute_map``), their types
    (``openapi_types``) and raise on missing required fields when built, which is what
    the API server's schema validation checks for these fields."""
    if value is None:
        return []
    m = _LIST.match(type_name)
    if m:
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {type(value).__name__}"]
        return [e for i, v in enumerate(value) for e in check_core_type(v, m.group(1), f"{where}[{i}]")]
    m = _DICT.match(type_name)
    if m:
        if not isinstance(value, dict):
            return [f"{where}: expected a mapping, got {type(value).__name__}"]
        return [e for k, v in value.items() for e in check_core_type(v, m.group(1), f"{where}.{k}")]
    if type_name == "object":  # IntOrString, Quantity-as-object, free-form
        return []
    if type_name == "str":
        return [] if isinstance(value, str) else [f"{where}: expected a string, got {value!r}"]
    if type_name == "bool":
        return [] if isinstance(value, bool) else [f"{where}: expected true/false, got {value!r}"]
    if type_name == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
        return [] if ok else [f"{where}: expected an integer, got {value!r}"]
    if type_name == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return [] if ok else [f"{where}: expected a number, got {value!r}"]
    if type_name == "datetime":
        return [] if isinstance(value, str) else [f"{where}: expected a timestamp string"]
    cls = _model(type_name)
    if not isinstance(value, dict):
        return [f"{where}: expected a {type_name} mapping, got {type(value).__name__}"]
    json_to_attr = {v: k for k, v in cls.attribute_map.items()}
    errors = [f"{where}: unknown field {key!r} for {type_name}"
              for key in value if key not in json_to_attr]
    kwargs = {}
    for key, item in value.items():
        attr = json_to_attr.get(key)
        if attr is None:
            continue
        errors += check_core_type(item, cls.openapi_types[attr], f"{where}.{key}")
        kwargs[attr] = item
    try:  # the model's constructor enforces required fields and enums it knows
        cls(**{k: v for k, v in kwargs.items()})
    except ValueError as e:
        errors.append(f"{where}: {type_name}: {e}")
    return errors


def _core_type_keyword(validator, type_name, instance, schema):
    for message in check_core_type(instance, type_name, "$"):
        yield jsonschema.ValidationError(message)


_BASE = jsonschema.validators.validator_for({"$schema": "https://json-schema.org/draft/2020-12/schema"})
Validator = jsonschema.validators.extend(_BASE, {"x-kubernetes-core-type": _core_type_keyword})


def kuberay_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def schema_for(kind: str) -> dict:
    if kind in RAY_KINDS:
        full = kuberay_schema()
        return {"$defs": full["$defs"], "$ref": f"#/$defs/{kind}"}
    api_version, model = CORE_KINDS[kind]
    return {"type": "object", "required": ["apiVersion", "kind", "metadata"],
            "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind}},
            "x-kubernetes-core-type": model}


def schema_errors(doc: dict) -> list[str]:
    kind = doc.get("kind") if isinstance(doc, dict) else None
    if kind not in KNOWN_KINDS:
        return [f"unknown kind {kind!r} (known: {sorted(KNOWN_KINDS)})"]
    name = (doc.get("metadata") or {}).get("name", "?")
    validator = Validator(schema_for(kind))
    return [f"{kind}/{name}: {'/'.join(map(str, e.absolute_path)) or '.'}: {e.message}"
            for e in validator.iter_errors(doc)]


# --------------------------------------------------------------------------- policy

def pod_templates(doc: dict) -> list[tuple[str, dict, bool]]:
    """(label, pod template, is_gpu_group) for every pod the object will create."""
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    out: list[tuple[str, dict, bool]] = []

    def cluster(cspec: dict, prefix: str) -> None:
        head = (cspec.get("headGroupSpec") or {}).get("template")
        if head is not None:
            out.append((f"{prefix}head", head, False))
        for group in cspec.get("workerGroupSpecs") or []:
            gpu = "gpu" in group.get("groupName", "")
            out.append((f"{prefix}{group.get('groupName')}", group.get("template") or {}, gpu))

    if kind == "Deployment":
        out.append(("pod", spec.get("template") or {}, False))
    elif kind == "RayCluster":
        cluster(spec, "")
    elif kind == "RayJob":
        cluster(spec.get("rayClusterSpec") or {}, "cluster.")
        if "submitterPodTemplate" in spec:
            out.append(("submitter", spec["submitterPodTemplate"], False))
    return out


def _env_secret_errors(where: str, env: Iterable[dict]) -> list[str]:
    errors = []
    for var in env or []:
        name = var.get("name", "")
        if "value" in var and re.search(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL)", name, re.I):
            errors.append(f"{where}: env {name} looks secret but is inlined; use secretKeyRef")
        value = str(var.get("value", ""))
        if re.search(r"://[^/\s:@]+:[^/\s@]+@", value):
            errors.append(f"{where}: env {name} embeds credentials in a URI; use secretKeyRef")
    return errors


def policy_errors(doc: dict) -> list[str]:
    kind = doc.get("kind")
    name = (doc.get("metadata") or {}).get("name", "?")
    me = f"{kind}/{name}"
    errors: list[str] = []
    if kind == "Secret":
        errors.append(f"{me}: Secret objects must not be committed; reference them instead")
    for label, tmpl, gpu in pod_templates(doc):
        pod = tmpl.get("spec") or {}
        psc = pod.get("securityContext") or {}
        if psc.get("runAsNonRoot") is not True:
            errors.append(f"{me} {label}: pod securityContext.runAsNonRoot must be true")
        if psc.get("runAsUser") == 0:
            errors.append(f"{me} {label}: pod runs as uid 0")
        if (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            errors.append(f"{me} {label}: pod seccompProfile must be RuntimeDefault")
        containers = list(pod.get("containers") or []) + list(pod.get("initContainers") or [])
        if not containers:
            errors.append(f"{me} {label}: pod has no containers")
        for c in containers:
            where = f"{me} {label}/{c.get('name')}"
            res = c.get("resources") or {}
            for part in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in (res.get(part) or {}):
                        errors.append(f"{where}: resources.{part}.{r} missing")
            if gpu and GPU_RESOURCE not in (res.get("limits") or {}):
                errors.append(f"{where}: GPU group without a {GPU_RESOURCE} limit")
            if not gpu and GPU_RESOURCE in (res.get("limits") or {}):
                errors.append(f"{where}: {GPU_RESOURCE} requested outside a GPU group")
            sc = c.get("securityContext") or {}
            if sc.get("runAsNonRoot") is not True:
                errors.append(f"{where}: securityContext.runAsNonRoot must be true")
            if sc.get("allowPrivilegeEscalation") is not False:
                errors.append(f"{where}: securityContext.allowPrivilegeEscalation must be false")
            if sc.get("privileged"):
                errors.append(f"{where}: privileged container")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                errors.append(f"{where}: capabilities must drop ALL")
            if sc.get("runAsUser") == 0:
                errors.append(f"{where}: runs as uid 0")
            image = c.get("image", "")
            if not image or image.endswith(":latest") or ":" not in image.rsplit("/", 1)[-1]:
                errors.append(f"{where}: image {image!r} must carry an explicit, non-latest tag")
            errors += _env_secret_errors(where, c.get("env"))
    if kind == "RayJob":
        spec = doc.get("spec") or {}
        if spec.get("shutdownAfterJobFinishes") is not True:
            errors.append(f"{me}: shutdownAfterJobFinishes must be true")
        if not isinstance(spec.get("ttlSecondsAfterFinished"), int):
            errors.append(f"{me}: ttlSecondsAfterFinished must be set")
        if not spec.get("entrypoint", "").startswith("mar3d "):
            errors.append(f"{me}: entrypoint must be a `mar3d ...` command")
        if "rayClusterSpec" not in spec:
            errors.append(f"{me}: a one-off RayJob must define its own rayClusterSpec")
        errors += _num_workers_errors(me, spec)
    if kind == "Role" and name == "mar3d-pipeline-rayjobs":
        errors += rbac_errors(doc)
    return errors


ENTRYPOINT_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def runtime_env_vars(spec: dict) -> dict[str, str]:
    env = (yaml.safe_load(spec.get("runtimeEnvYAML") or "") or {}).get("env_vars") or {}
    return {str(k): str(v) for k, v in env.items()}


def expand_entrypoint(spec: dict) -> str:
    """The entrypoint as the job's shell will run it (variables from runtimeEnvYAML)."""
    env = runtime_env_vars(spec)
    return ENTRYPOINT_VAR.sub(lambda m: env.get(m.group(1), m.group(0)), spec.get("entrypoint", ""))


def _num_workers_errors(me: str, spec: dict) -> list[str]:
    """Entrypoint variables must be defined, and a training job's --num-workers (from
    MAR3D_NUM_WORKERS) must equal its worker group, MAR3D_USE_GPU its device."""
    env = runtime_env_vars(spec)
    undefined = sorted(set(ENTRYPOINT_VAR.findall(spec.get("entrypoint", ""))) - set(env))
    if undefined:
        return [f"{me}: entrypoint uses {undefined} but runtimeEnvYAML env_vars does not set them"]
    if "MAR3D_NUM_WORKERS" not in env:
        return []
    if "MAR3D_USE_GPU" not in env:
        return [f"{me}: MAR3D_NUM_WORKERS without MAR3D_USE_GPU"]
    groups = (spec.get("rayClusterSpec") or {}).get("workerGroupSpecs") or []
    total = sum(int(g.get("replicas", 0)) * int(g.get("numOfHosts", 1)) for g in groups)
    if int(env["MAR3D_NUM_WORKERS"]) != total:
        return [f"{me}: MAR3D_NUM_WORKERS={env['MAR3D_NUM_WORKERS']} but the worker groups "
                f"have {total} replicas"]
    has_gpu = any(GPU_RESOURCE in ((c.get("resources") or {}).get("limits") or {})
                  for g in groups for c in (g.get("template") or {}).get("spec", {}).get("containers", []))
    if (str(env["MAR3D_USE_GPU"]).lower() == "true") != has_gpu:
        return [f"{me}: MAR3D_USE_GPU={env['MAR3D_USE_GPU']} but GPU workers: {has_gpu}"]
    return []


def rbac_errors(role: dict) -> list[str]:
    rules = [{k: sorted(r.get(k) or []) for k in ("apiGroups", "resources", "verbs")}
             for r in role.get("rules") or []]
    for r in role.get("rules") or []:
        if set(r) - {"apiGroups", "resources", "verbs"}:
            return [f"Role/{role['metadata']['name']}: unexpected rule keys {sorted(set(r))}"]
    want = [{k: sorted(v) for k, v in r.items()} for r in PIPELINE_RULES]
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    if sorted(rules, key=key) != sorted(want, key=key):
        return [f"Role/{role['metadata']['name']}: rules {rules} differ from the least-privilege "
                f"set {want}"]
    return []


def cross_object_errors(docs: list[dict]) -> list[str]:
    """References between objects of one rendered kustomization."""
    errors = []
    by_kind: dict[str, set[str]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], set()).add(d["metadata"]["name"])
    for d in docs:
        me = f"{d['kind']}/{d['metadata']['name']}"
        for label, tmpl, _ in pod_templates(d):
            pod = tmpl.get("spec") or {}
            sa = pod.get("serviceAccountName")
            if sa and sa not in by_kind.get("ServiceAccount", set()):
                errors.append(f"{me} {label}: service account {sa!r} is not defined")
            for vol in pod.get("volumes") or []:
                claim = (vol.get("persistentVolumeClaim") or {}).get("claimName")
                if claim and claim not in by_kind.get("PersistentVolumeClaim", set()):
                    errors.append(f"{me} {label}: PVC {claim!r} is not defined")
            for c in pod.get("containers") or []:
                for var in c.get("env") or []:
                    ref = (var.get("valueFrom") or {}).get("configMapKeyRef")
                    if ref and ref["name"] not in by_kind.get("ConfigMap", set()):
                        errors.append(f"{me} {label}: ConfigMap {ref['name']!r} is not defined")
    for d in docs:
        if d["kind"] == "RoleBinding":
            role = d["roleRef"]["name"]
            if role not in by_kind.get("Role", set()):
                errors.append(f"RoleBinding/{d['metadata']['name']}: Role {role!r} is not defined")
            for s in d.get("subjects") or []:
                if s["kind"] == "ServiceAccount" and s["name"] not in by_kind.get("ServiceAccount", set()):
                    errors.append(f"RoleBinding/{d['metadata']['name']}: unknown subject {s['name']!r}")
    bound = {(s.get("name"), d["roleRef"]["name"]) for d in docs if d["kind"] == "RoleBinding"
             for s in d.get("subjects") or []}
    if (PIPELINE_SERVICE_ACCOUNT, "mar3d-pipeline-rayjobs") not in bound:
        errors.append(f"{PIPELINE_SERVICE_ACCOUNT} is not bound to Role mar3d-pipeline-rayjobs")
    roles_of_pipeline = {r for s, r in bound if s == PIPELINE_SERVICE_ACCOUNT}
    if roles_of_pipeline != {"mar3d-pipeline-rayjobs"}:
        errors.append(f"{PIPELINE_SERVICE_ACCOUNT} is bound to more roles: {sorted(roles_of_pipeline)}")
    return errors


# --------------------------------------------------------------------------- kustomize

class KustomizeError(ValueError):
    """A kustomization that uses something this offline renderer cannot resolve."""


SUPPORTED_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "labels", "resources",
                                "images", "patches"}


def load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str], op: str) -> tuple[Any, str]:
    node = doc
    for p in parts[:-1]:
        if isinstance(node, list):
            node = node[int(p)]
        elif isinstance(node, dict) and p in node:
            node = node[p]
        else:
            raise KustomizeError(f"{op}: path segment {p!r} does not exist")
    return node, parts[-1]


def apply_json6902(doc: dict, ops: list[dict]) -> dict:
    """RFC 6902 add/replace/remove/test, failing loudly like kustomize does."""
    doc = copy.deepcopy(doc)
    for o in ops:
        op, parts = o["op"], _pointer(o["path"])
        parent, last = _walk(doc, parts, f"{op} {o['path']}")
        if op == "test":
            current = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if current != o["value"]:
                raise KustomizeError(f"test {o['path']}: {current!r} != {o['value']!r}")
        elif op in ("replace", "remove"):
            if isinstance(parent, list):
                idx = int(last)
                if not 0 <= idx < len(parent):
                    raise KustomizeError(f"{op} {o['path']}: index out of range")
                if op == "replace":
                    parent[idx] = copy.deepcopy(o["value"])
                else:
                    del parent[idx]
            else:
                if last not in parent:
                    raise KustomizeError(f"{op} {o['path']}: nothing to {op}")
                if op == "replace":
                    parent[last] = copy.deepcopy(o["value"])
                else:
                    del parent[last]
        elif op == "add":
            if isinstance(parent, list):
                parent.insert(len(parent) if last == "-" else int(last), copy.deepcopy(o["value"]))
            else:
                parent[last] = copy.deepcopy(o["value"])
        else:
            raise KustomizeError(f"unsupported JSON patch op {op!r}")
    return doc


def _selector_matches(selector: str, labels: dict[str, str]) -> bool:
    for term in re.split(r",(?![^()]*\))", selector):
        term = term.strip()
        m = re.fullmatch(r"([\w./-]+)\s+in\s+\(([^)]*)\)", term)
        if m:
            if labels.get(m.group(1)) not in {v.strip() for v in m.group(2).split(",")}:
                return False
            continue
        m = re.fullmatch(r"([\w./-]+)\s*==?\s*([\w./-]+)", term)
        if not m:
            raise KustomizeError(f"unsupported label selector term {term!r}")
        if labels.get(m.group(1)) != m.group(2):
            return False
    return True


def _targets(target: dict, doc: dict) -> bool:
    unknown = set(target) - {"kind", "name", "labelSelector", "group", "version"}
    if unknown:
        raise KustomizeError(f"unsupported patch target keys {sorted(unknown)}")
    meta = doc.get("metadata") or {}
    if "kind" in target and doc.get("kind") != target["kind"]:
        return False
    if "name" in target and meta.get("name") != target["name"]:
        return False
    if "labelSelector" in target and not _selector_matches(target["labelSelector"], meta.get("labels") or {}):
        return False
    return True


def _set_images(node: Any, images: list[dict]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "image" and isinstance(v, str):
                name = v.rsplit(":", 1)[0] if ":" in v.rsplit("/", 1)[-1] else v
                for img in images:
                    if img["name"] == name:
                        tag = img.get("newTag", v[len(name) + 1:] if len(v) > len(name) else "")
                        node[k] = f"{img.get('newName', name)}:{tag}" if tag else img.get("newName", name)
            else:
                _set_images(v, images)
    elif isinstance(node, list):
        for v in node:
            _set_images(v, images)


def render(kustomization_dir: Path) -> list[dict]:
    """The objects ``kustomize build kustomization_dir`` would emit (features used here)."""
    kdir = Path(kustomization_dir)
    kfile = kdir / "kustomization.yaml"
    if not kfile.is_file():
        raise KustomizeError(f"{kdir}: no kustomization.yaml")
    k = yaml.safe_load(kfile.read_text())
    unknown = set(k) - SUPPORTED_KUSTOMIZATION_KEYS
    if unknown:
        raise KustomizeError(f"{kfile}: keys {sorted(unknown)} are not handled by the offline renderer")
    docs: list[dict] = []
    for res in k.get("resources") or []:
        path = (kdir / res).resolve()
        if path.is_dir():
            docs += render(path)
        elif path.is_file():
            docs += load_yaml_docs(path)
        else:
            raise KustomizeError(f"{kfile}: resource {res!r} does not exist")
    for patch in k.get("patches") or []:
        if "path" in patch:
            ppath = kdir / patch["path"]
            if not ppath.is_file():
                raise KustomizeError(f"{kfile}: patch file {patch['path']!r} does not exist")
            ops = yaml.safe_load(ppath.read_text())
        else:
            ops = yaml.safe_load(patch["patch"])
        if not isinstance(ops, list):
            raise KustomizeError(f"{kfile}: only JSON6902 (list of ops) patches are used here")
        target = patch.get("target")
        if not target:
            raise KustomizeError(f"{kfile}: JSON6902 patches need a target")
        hits = [i for i, d in enumerate(docs) if _targets(target, d)]
        if not hits:
            raise KustomizeError(f"{kfile}: patch target {target} matches no object")
        for i in hits:
            docs[i] = apply_json6902(docs[i], ops)
    for label_set in k.get("labels") or []:
        for d in docs:
            d.setdefault("metadata", {}).setdefault("labels", {}).update(label_set.get("pairs") or {})
    if k.get("images"):
        for d in docs:
            _set_images(d, k["images"])
    if k.get("namespace"):
        ns = k["namespace"]
        for d in docs:
            if d["kind"] != "Namespace":
                d.setdefault("metadata", {})["namespace"] = ns
            for s in d.get("subjects") or []:
                if s.get("kind") == "ServiceAccount":
                    s["namespace"] = ns
    seen = set()
    for d in docs:
        key = (d["kind"], d["metadata"]["name"])
        if key in seen:
            raise KustomizeError(f"{kfile}: duplicate object {key}")
        seen.add(key)
    return docs


# --------------------------------------------------------------------------- driver

def validate_docs(docs: list[dict]) -> list[str]:
    errors: list[str] = []
    for d in docs:
        errors += schema_errors(d)
        errors += policy_errors(d)
    if not errors:
        errors += cross_object_errors(docs)
    return errors


def validate_all() -> dict[str, list[str]]:
    report = {"base": validate_docs(render(K8S_DIR / "base"))}
    for name in OVERLAYS:
        report[f"overlays/{name}"] = validate_docs(render(K8S_DIR / "overlays" / name))
    return report


def main() -> int:
    failed = False
    for target, errors in validate_all().items():
        print(f"{target}: {'ok' if not errors else f'{len(errors)} error(s)'}")
        for e in errors:
            print(f"  - {e}")
        failed |= bool(errors)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
