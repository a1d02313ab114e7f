"""Offline validation of the mar3d Kubernetes manifests (no cluster needed).

    python k8s/validate.py                 # k8s/base and every overlay; exit 1 on errors
    python k8s/validate.py overlays/dev    # one kustomization (a path under k8s/ or any path)

1. Render: ``kubectl kustomize`` (kustomize v5, built into kubectl) builds each target;
   a kustomization it cannot build is an error.
2. Schema: the standard kinds are checked by ``kubernetes-validate`` against its strict
   schemas (unknown fields are errors) for Kubernetes ``--kube-version``; it reports the
   first error of each object. RayCluster/RayJob/RayService are checked against
   ``spec.versions[].schema.openAPIV3Schema`` of the released KubeRay CRDs (``--crds``),
   every error reported, unknown fields rejected as the API server's strict field
   validation (kubectl's default) does, and deprecated CRD versions refused.
3. Project rules the schemas cannot express: cpu/memory requests and limits, GPU limits
   exactly in GPU groups, non-root pods, pinned image tags, secrets only by reference,
   no committed Secrets, RayJobs that clean up and run ``mar3d ...`` with a worker count
   matching their worker groups, the pipeline's least-privilege Role, and references
   between objects (service accounts, PVCs, ConfigMaps, RoleBindings); Ray token
   authentication on every Ray cluster and RayJob submitter, MLflow's basic-auth app.

Every error names the target, the object (with the file it comes from) and the field.
It does not replace ``kubectl apply --dry-run=server`` against a cluster with the CRDs
installed, which also runs CEL rules and admission webhooks.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterable

import jsonschema
import kubernetes_validate
import yaml

K8S_DIR = Path(__file__).resolve().parent
REPO = K8S_DIR.parent
OVERLAYS = tuple(sorted(p.parent.name for p in (K8S_DIR / "overlays").glob("*/kustomization.yaml")))
# Released KubeRay CRDs, read in place (never copied into the project).
CRDS_DIR = Path(os.environ.get("MAR3D_KUBERAY_CRDS", REPO.parent / "shared" / "reference" / "kuberay-crds-v1.7.0"))
# Kubernetes 1.31: one minor below the kubectl (v1.32) this check was set up with, i.e. the
# oldest API server that kubectl supports (client/server skew of one minor). Fields that
# validate against 1.31 are accepted by every cluster that kubectl can deploy to, while
# fields only newer minors know are refused. Pass --kube-version for another cluster.
KUBE_VERSION = os.environ.get("MAR3D_KUBE_VERSION", "1.31")
RAY_KINDS = {"RayCluster", "RayJob", "RayService"}

PIPELINE_SERVICE_ACCOUNT = "mar3d-pipeline"
PIPELINE_RULES = [  # exactly what the pipeline may do; anything more is a finding
    {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list", "watch"]},
    {"apiGroups": ["ray.io"], "resources": ["rayjobs/status"], "verbs": ["get"]},
]
GPU_RESOURCE = "nvidia.com/gpu"


class RenderError(RuntimeError):
    """``kubectl kustomize`` is missing or refused a kustomization."""


# --------------------------------------------------------------------------- render

# libyaml's safe loader where PyYAML was built with it: the same documents, parsed ~5x
# faster (the KubeRay CRDs took ~8 s with the pure-Python loader of yaml.safe_load_all).
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def safe_yaml_docs(text: str) -> list[dict]:
    """The non-empty documents of ``text``, read by :data:`SAFE_LOADER` (plain data only)."""
    loader = SAFE_LOADER(text)
    try:
        docs = []
        while loader.check_data():
            doc = loader.get_data()
            if doc is not None:
                docs.append(doc)
        return docs
    finally:
        loader.dispose()


def load_yaml_docs(path: Path) -> list[dict]:
    return safe_yaml_docs(Path(path).read_text())


def render(kustomization_dir: Path) -> list[dict]:
    """The objects ``kubectl kustomize kustomization_dir`` emits."""
    kubectl = os.environ.get("KUBECTL") or shutil.which("kubectl")
    if not kubectl:
        raise RenderError("kubectl not found: put kubectl (>= 1.27, kustomize v5 built in) on "
                          "PATH or set KUBECTL")
    try:
        proc = subprocess.run([kubectl, "kustomize", str(kustomization_dir)],
                              capture_output=True, text=True, check=False)
    except OSError as e:
        raise RenderError(f"cannot run kubectl ({kubectl}): {e}") from e
    if proc.returncode != 0:
        raise RenderError(f"{kustomization_dir}: kubectl kustomize failed: {proc.stderr.strip()}")
    return safe_yaml_docs(proc.stdout)


@functools.lru_cache(maxsize=None)
def _sources() -> dict[tuple[str, str], str]:
    """(kind, name) -> the file under k8s/ that defines it, to say where an error comes from."""
    out = {}
    for path in sorted(K8S_DIR.rglob("*.yaml")):
        if path.name == "kustomization.yaml" or "patches" in path.parts:
            continue
        for d in load_yaml_docs(path):
            if isinstance(d, dict):
                name = (d.get("metadata") or {}).get("name")
                out.setdefault((d.get("kind"), name), str(path.relative_to(K8S_DIR)))
    return out


def _who(doc: dict) -> str:
    kind, name = doc.get("kind"), (doc.get("metadata") or {}).get("name", "?")
    src = _sources().get((kind, name))
    return f"{kind}/{name}" + (f" ({src})" if src else "")


def _field(path: Iterable) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out.lstrip(".") or "(object)"


# --------------------------------------------------------------------------- schema

def _strict(schema: dict) -> dict:
    """A CRD's structural schema as JSON Schema with the API server's strict field
    validation: objects with declared properties reject unknown fields (unless marked
    x-kubernetes-preserve-unknown-fields), and ``nullable`` allows null."""
    out = dict(schema)
    if isinstance(out.get("properties"), dict):
        out["properties"] = {k: _strict(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _strict(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if isinstance(out.get(key), list):
            out[key] = [_strict(s) for s in out[key]]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


@functools.lru_cache(maxsize=None)
def crd_schemas(crds_dir: Path = CRDS_DIR) -> dict[tuple[str, str], tuple[dict, str | None]]:
    """(apiVersion, kind) -> (strict JSON Schema, the storage apiVersion if this one is
    deprecated) for every served version of every CRD in ``crds_dir``."""
    crds_dir = Path(crds_dir)
    files = sorted(crds_dir.glob("*.yaml")) if crds_dir.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"KubeRay CRDs not found in {crds_dir} (expected the released v1.7.0 CRD YAMLs, "
            "ray.io_*.yaml); point --crds or MAR3D_KUBERAY_CRDS at them")
    out = {}
    for path in files:
        for crd in load_yaml_docs(path):
            if crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            storage = [f"{group}/{v['name']}" for v in crd["spec"]["versions"] if v.get("storage")]
            for v in crd["spec"]["versions"]:
                if v.get("served", True):
                    schema = _strict(v["schema"]["openAPIV3Schema"])
                    out[(f"{group}/{v['name']}", kind)] = (schema, storage[0] if v.get("deprecated") else None)
    return out


def schema_errors(doc: dict, kube_version: str | None = None, crds_dir: Path | None = None) -> list[str]:
    """Schema errors of one rendered object, each naming the object and the field."""
    if not isinstance(doc, dict) or not doc.get("kind") or not doc.get("apiVersion"):
        return [f"{doc!r:.80}: not a Kubernetes object (no kind/apiVersion)"]
    me, kind, api = _who(doc), doc["kind"], doc["apiVersion"]
    if kind in RAY_KINDS or api.startswith("ray.io/"):
        crds = crd_schemas(Path(crds_dir) if crds_dir else CRDS_DIR)
        if (api, kind) not in crds:
            known = sorted(f"{a} {k}" for a, k in crds)
            return [f"{me}: no served CRD version for {api} {kind} (known: {known})"]
        schema, use_instead = crds[(api, kind)]
        errors = [f"{me}: apiVersion {api} is deprecated in the KubeRay CRDs; use {use_instead}"] if use_instead else []
        validator = jsonschema.Draft4Validator(schema)  # OpenAPI v3.0 schemas are draft-4 style
        return errors + [f"{me}: {_field(e.absolute_path)}: {e.message}"
                         for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]
    version = kube_version or KUBE_VERSION
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{me}: {_field(e.path)}: {e.message}"]
    except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as e:
        return [f"{me}: {e.message}"]
    return []


# --------------------------------------------------------------------------- project rules

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

    if kind in ("Deployment", "Job"):
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
    me = _who(doc)
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
    errors += auth_errors(doc)
    if kind == "RayJob":
        spec = doc.get("spec") or {}
        if spec.get("shutdownAfterJobFinishes") is not True:
            errors.append(f"{me}: spec.shutdownAfterJobFinishes must be true")
        if not isinstance(spec.get("ttlSecondsAfterFinished"), int):
            errors.append(f"{me}: spec.ttlSecondsAfterFinished must be set")
        if not spec.get("entrypoint", "").startswith("mar3d "):
            errors.append(f"{me}: spec.entrypoint must be a `mar3d ...` command")
        if "rayClusterSpec" not in spec:
            errors.append(f"{me}: a one-off RayJob must define its own spec.rayClusterSpec")
        # The CRD leaves submissionMode a free string (the operator checks it when it runs
        # the job); the submitterPodTemplate these jobs define is what K8sJobMode runs.
        if "submitterPodTemplate" in spec and spec.get("submissionMode", "K8sJobMode") != "K8sJobMode":
            errors.append(f"{me}: spec.submissionMode {spec.get('submissionMode')!r} must be K8sJobMode "
                          "(the mode that runs spec.submitterPodTemplate)")
        errors += _num_workers_errors(me, spec)
    if kind == "Role" and name == "mar3d-pipeline-rayjobs":
        errors += rbac_errors(doc)
    return errors


RAY_AUTH_SECRET = "mar3d-ray-auth"


def _secret_env(container: dict, name: str) -> str | None:
    """The Secret that env ``name`` of ``container`` comes from (None: not from one)."""
    for var in container.get("env") or []:
        if var.get("name") == name:
            return ((var.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name")
    return None


def auth_errors(doc: dict) -> list[str]:
    """Nobody reaches Ray or MLflow without credentials: every Ray cluster (long-lived or
    a RayJob's own) has token authentication from the Secret, a RayJob's submitter
    carries that token, and the MLflow server runs its basic-auth app with the admin
    password from a Secret."""
    kind, spec, me = doc.get("kind"), doc.get("spec") or {}, _who(doc)
    errors = []
    clusters = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec") or {}}
    if kind in clusters:
        auth = clusters[kind].get("authOptions") or {}
        where = "spec.authOptions" if kind == "RayCluster" else "spec.rayClusterSpec.authOptions"
        if auth.get("mode") != "token" or auth.get("secretName") != RAY_AUTH_SECRET:
            errors.append(f"{me}: {where} must be mode token with secretName {RAY_AUTH_SECRET} "
                          f"(Ray token authentication), got {auth or 'nothing'}")
    if kind == "RayJob" and "submitterPodTemplate" in spec:
        for c in (spec["submitterPodTemplate"].get("spec") or {}).get("containers") or []:
            if _secret_env(c, "RAY_AUTH_TOKEN") != RAY_AUTH_SECRET:
                errors.append(f"{me} submitter/{c.get('name')}: env RAY_AUTH_TOKEN must come from "
                              f"Secret {RAY_AUTH_SECRET} (the submitter talks to a token-authenticated cluster)")
    if kind == "Deployment" and (doc.get("metadata") or {}).get("name") == "mlflow":
        for c in ((spec.get("template") or {}).get("spec") or {}).get("containers") or []:
            args = [str(a) for a in c.get("args") or []]
            if "--app-name" not in args or args[args.index("--app-name") + 1:][:1] != ["basic-auth"]:
                errors.append(f"{me} {c.get('name')}: the MLflow server must run with "
                              "--app-name basic-auth (no anonymous access to runs and the registry)")
            if not _secret_env(c, "MLFLOW_AUTH_ADMIN_PASSWORD"):
                errors.append(f"{me} {c.get('name')}: env MLFLOW_AUTH_ADMIN_PASSWORD must come from a Secret")
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
        return [f"{me}: spec.entrypoint uses {undefined} but runtimeEnvYAML env_vars does not set them"]
    if "MAR3D_NUM_WORKERS" not in env:
        return []
    if "MAR3D_USE_GPU" not in env:
        return [f"{me}: spec.runtimeEnvYAML: MAR3D_NUM_WORKERS without MAR3D_USE_GPU"]
    groups = (spec.get("rayClusterSpec") or {}).get("workerGroupSpecs") or []
    total = sum(int(g.get("replicas", 0)) * int(g.get("numOfHosts", 1)) for g in groups)
    if int(env["MAR3D_NUM_WORKERS"]) != total:
        return [f"{me}: spec.runtimeEnvYAML: MAR3D_NUM_WORKERS={env['MAR3D_NUM_WORKERS']} but the "
                f"worker groups have {total} replicas"]
    has_gpu = any(GPU_RESOURCE in ((c.get("resources") or {}).get("limits") or {})
                  for g in groups for c in (g.get("template") or {}).get("spec", {}).get("containers", []))
    if (str(env["MAR3D_USE_GPU"]).lower() == "true") != has_gpu:
        return [f"{me}: spec.runtimeEnvYAML: MAR3D_USE_GPU={env['MAR3D_USE_GPU']} but GPU workers: {has_gpu}"]
    return []


def rbac_errors(role: dict) -> list[str]:
    me = _who(role)
    rules = [{k: sorted(r.get(k) or []) for k in ("apiGroups", "resources", "verbs")}
             for r in role.get("rules") or []]
    for r in role.get("rules") or []:
        if set(r) - {"apiGroups", "resources", "verbs"}:
            return [f"{me}: rules: unexpected rule keys {sorted(set(r))}"]
    want = [{k: sorted(v) for k, v in r.items()} for r in PIPELINE_RULES]
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    if sorted(rules, key=key) != sorted(want, key=key):
        return [f"{me}: rules {rules} differ from the least-privilege set {want}"]
    return []


def cross_object_errors(docs: list[dict]) -> list[str]:
    """References between objects of one rendered kustomization."""
    errors = []
    by_kind: dict[str, set[str]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], set()).add(d["metadata"]["name"])
    for d in docs:
        me = _who(d)
        for label, tmpl, _ in pod_templates(d):
            pod = tmpl.get("spec") or {}
            sa = pod.get("serviceAccountName")
            if sa and sa not in by_kind.get("ServiceAccount", set()):
                errors.append(f"{me} {label}: serviceAccountName {sa!r} is not defined")
            for vol in pod.get("volumes") or []:
                claim = (vol.get("persistentVolumeClaim") or {}).get("claimName")
                if claim and claim not in by_kind.get("PersistentVolumeClaim", set()):
                    errors.append(f"{me} {label}: volume {vol.get('name')!r}: PVC {claim!r} is not defined")
            for c in pod.get("containers") or []:
                for var in c.get("env") or []:
                    ref = (var.get("valueFrom") or {}).get("configMapKeyRef")
                    if ref and ref["name"] not in by_kind.get("ConfigMap", set()):
                        errors.append(f"{me} {label}/{c.get('name')}: env {var.get('name')}: "
                                      f"ConfigMap {ref['name']!r} is not defined")
    for d in docs:
        if d["kind"] == "RoleBinding":
            role = d["roleRef"]["name"]
            if role not in by_kind.get("Role", set()):
                errors.append(f"{_who(d)}: roleRef: Role {role!r} is not defined")
            for s in d.get("subjects") or []:
                if s["kind"] == "ServiceAccount" and s["name"] not in by_kind.get("ServiceAccount", set()):
                    errors.append(f"{_who(d)}: subjects: unknown ServiceAccount {s['name']!r}")
    bound = {(s.get("name"), d["roleRef"]["name"]) for d in docs if d["kind"] == "RoleBinding"
             for s in d.get("subjects") or []}
    if (PIPELINE_SERVICE_ACCOUNT, "mar3d-pipeline-rayjobs") not in bound:
        errors.append(f"ServiceAccount/{PIPELINE_SERVICE_ACCOUNT} is not bound to Role mar3d-pipeline-rayjobs")
    roles_of_pipeline = {r for s, r in bound if s == PIPELINE_SERVICE_ACCOUNT}
    if roles_of_pipeline != {"mar3d-pipeline-rayjobs"}:
        errors.append(f"ServiceAccount/{PIPELINE_SERVICE_ACCOUNT} is bound to more roles: "
                      f"{sorted(roles_of_pipeline)}")
    return errors


# --------------------------------------------------------------------------- driver

def validate_docs(docs: list[dict], kube_version: str | None = None, crds_dir: Path | None = None) -> list[str]:
    errors: list[str] = []
    for d in docs:
        errors += schema_errors(d, kube_version, crds_dir)
        errors += policy_errors(d)
    if not errors:
        errors += cross_object_errors(docs)
    return errors


def default_targets() -> list[str]:
    return ["base"] + [f"overlays/{o}" for o in OVERLAYS]


def validate_all(targets: list[str] | None = None, kube_version: str | None = None,
                 crds_dir: Path | None = None) -> dict[str, list[str]]:
    report = {}
    for target in targets or default_targets():
        path = K8S_DIR / target if (K8S_DIR / target).is_dir() else Path(target)
        try:
            report[target] = validate_docs(render(path), kube_version, crds_dir)
        except RenderError as e:
            report[target] = [str(e)]
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Render the mar3d kustomizations with `kubectl kustomize` and check them: "
                    "standard kinds with kubernetes-validate, KubeRay kinds against the released "
                    "CRD schemas, plus the project's own rules. Exit 1 on any error.")
    parser.add_argument("targets", nargs="*", metavar="TARGET",
                        help=f"kustomization dirs, relative to k8s/ or as paths (default: "
                             f"{' '.join(default_targets())})")
    parser.add_argument("--crds", type=Path, default=CRDS_DIR,
                        help="folder with the KubeRay CRD YAMLs (default: $MAR3D_KUBERAY_CRDS or %(default)s)")
    parser.add_argument("--kube-version", default=KUBE_VERSION,
                        help="Kubernetes version whose schemas the standard kinds are checked "
                             "against (default: $MAR3D_KUBE_VERSION or %(default)s)")
    args = parser.parse_args(argv)
    try:
        crd_schemas(args.crds)  # fail once, clearly, if the CRDs are not there
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:  # ... or kubernetes-validate has no schemas for the version asked for
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}},
                                     args.kube_version, strict=True)
    except Exception as e:  # VersionNotSupportedError is not exported by the package
        print(f"error: kubernetes-validate {kubernetes_validate.__version__} has no schemas for "
              f"Kubernetes {args.kube_version}: {getattr(e, 'message', e)}", file=sys.stderr)
        return 2
    failed = False
    for target, errors in validate_all(args.targets, args.kube_version, args.crds).items():
        print(f"{target}: {'ok' if not errors else f'{len(errors)} error(s)'}")
        for e in errors:
            print(f"  - {e}")
        failed |= bool(errors)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
