"""Offline validation of k8s/ with the real tools (``kubectl kustomize`` renders every
kustomization, kubernetes-validate checks the standard kinds, the released KubeRay CRD
schemas the Ray kinds), the project's own rules, and the structure of the container/cluster
definitions in infra/. No cluster, no docker."""
from __future__ import annotations

import copy
import importlib.util
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
INFRA = REPO / "infra"


def _load_validator():
    spec = importlib.util.spec_from_file_location("mar3d_k8s_validate", K8S / "validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


V = _load_validator()
TARGETS = V.default_targets()


@pytest.fixture(scope="module")
def base_docs() -> list[dict]:
    return V.render(K8S / "base")


def _one(docs, kind, name):
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}"
    return copy.deepcopy(found[0])


def _overlay(tmp_path: Path, patches: list[tuple[dict, list[dict]]]) -> Path:
    """A kustomization on top of k8s/base with JSON6902 ``patches`` [(target, ops)]."""
    kdir = tmp_path / "overlay"
    kdir.mkdir()
    k = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
         "resources": [os.path.relpath(K8S / "base", kdir)],
         "patches": [{"target": t, "patch": yaml.safe_dump(ops)} for t, ops in patches]}
    (kdir / "kustomization.yaml").write_text(yaml.safe_dump(k))
    return kdir


# ------------------------------------------------------------------ files and kustomize

def test_overlays_are_found_and_the_tools_are_there():
    assert set(V.OVERLAYS) == {"local", "dev", "prod"}
    out = subprocess.run([os.environ.get("KUBECTL") or "kubectl", "version", "--client"],
                         capture_output=True, text=True, check=True).stdout
    assert "Kustomize Version: v5" in out
    crds = V.crd_schemas()
    assert {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob")} <= set(crds)


def test_every_yaml_file_parses_and_each_object_is_schema_valid():
    """Each source file on its own, before kustomize: standard kinds against the
    Kubernetes schemas, Ray kinds against the KubeRay CRDs."""
    files = sorted(K8S.rglob("*.yaml"))
    assert len(files) > 15
    for path in files:
        docs = V.load_yaml_docs(path)
        assert docs, f"{path} is empty"
        if path.name == "kustomization.yaml":
            assert docs[0]["kind"] == "Kustomization"
        elif path.parent.name == "patches":
            assert all(isinstance(op, dict) and {"op", "path"} <= set(op) for op in docs[0]), path
        else:
            for d in docs:
                assert V.schema_errors(d) == [], path


def test_kustomizations_reference_existing_files():
    for kfile in sorted(K8S.rglob("kustomization.yaml")):
        k = yaml.safe_load(kfile.read_text())
        for res in k.get("resources", []):
            assert (kfile.parent / res).exists(), f"{kfile}: {res}"
        for patch in k.get("patches", []):
            assert (kfile.parent / patch["path"]).is_file(), f"{kfile}: {patch['path']}"
            assert patch.get("target"), f"{kfile}: {patch['path']} has no target"
    # every file in base is part of the base kustomization (nothing forgotten)
    listed = {(K8S / "base" / r).resolve() for r in yaml.safe_load((K8S / "base/kustomization.yaml").read_text())["resources"]}
    on_disk = {p.resolve() for p in (K8S / "base").rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert on_disk == listed


@pytest.mark.parametrize("target", TARGETS)
def test_rendered_manifests_are_valid(target):
    docs = V.render(K8S / target)
    assert {d["kind"] for d in docs} >= {"RayCluster", "RayJob", "Deployment", "Service", "Role",
                                         "RoleBinding", "ServiceAccount", "PersistentVolumeClaim"}
    assert V.validate_docs(docs) == []
    assert all(d["metadata"].get("namespace") == "mar3d" for d in docs if d["kind"] != "Namespace")


def test_overlays_change_what_they_claim():
    local = {(d["kind"], d["metadata"]["name"]): d for d in V.render(K8S / "overlays/local")}
    prod = {(d["kind"], d["metadata"]["name"]): d for d in V.render(K8S / "overlays/prod")}
    vae_local = local[("RayJob", "mar3d-train-vae")]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert "nvidia.com/gpu" not in vae_local["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert local[("RayCluster", "mar3d")]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == "mar3d:local"
    vae_prod = prod[("RayJob", "mar3d-train-vae")]["spec"]
    assert vae_prod["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 8
    assert 'MAR3D_NUM_WORKERS: "8"' in vae_prod["runtimeEnvYAML"]
    assert prod[("Deployment", "mlflow")]["spec"]["replicas"] == 2


def test_kustomize_failures_are_loud(tmp_path):
    kdir = _overlay(tmp_path, [({"kind": "Deployment", "name": "mlflow"},
                                [{"op": "remove", "path": "/spec/missing"}])])
    with pytest.raises(V.RenderError, match="kubectl kustomize failed: .*nonexistent key: missing"):
        V.render(kdir)
    report = V.validate_all([str(kdir)])
    assert len(report[str(kdir)]) == 1 and "kubectl kustomize failed" in report[str(kdir)][0]


# ------------------------------------------------------------------ schema catches errors

def test_the_schemas_reject_what_the_api_server_would(base_docs):
    job = _one(base_docs, "RayJob", "mar3d-train-vae")
    assert V.schema_errors(job) == []
    me = "RayJob/mar3d-train-vae (base/ray/rayjob-train-vae.yaml): "

    def errors(doc):
        found = V.schema_errors(doc)
        assert all(e.startswith(me) for e in found), found
        return found

    bad = copy.deepcopy(job); bad["spec"]["shutdownAfterJobFinish"] = True  # typo'd field
    assert errors(bad) == [me + "spec: Additional properties are not allowed ('shutdownAfterJobFinish' was unexpected)"]
    bad = copy.deepcopy(job); bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "2"
    assert errors(bad) == [me + "spec.rayClusterSpec.workerGroupSpecs[0].replicas: '2' is not of type 'integer'"]
    bad = copy.deepcopy(job); del bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]
    assert errors(bad) == [me + "spec.rayClusterSpec.workerGroupSpecs[0]: 'template' is a required property"]
    bad = copy.deepcopy(job); bad["apiVersion"] = "ray.io/v1alpha1"
    assert any("ray.io/v1alpha1 is deprecated" in e and "use ray.io/v1" in e for e in errors(bad))
    bad = copy.deepcopy(job); bad["apiVersion"] = "ray.io/v2"
    assert any("no served CRD version for ray.io/v2 RayJob" in e for e in errors(bad))

    # core types embedded in the CRD are checked by the CRD's own schema
    pod = lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]  # noqa: E731
    head = "spec.rayClusterSpec.headGroupSpec.template.spec."
    bad = copy.deepcopy(job); pod(bad)["containers"][0]["imagePullPolicyy"] = "Always"
    assert errors(bad) == [me + head + "containers[0]: Additional properties are not allowed ('imagePullPolicyy' was unexpected)"]
    bad = copy.deepcopy(job); del pod(bad)["containers"][0]["name"]
    assert errors(bad) == [me + head + "containers[0]: 'name' is a required property"]
    bad = copy.deepcopy(job); pod(bad)["securityContext"]["runAsUser"] = "1000"
    assert errors(bad) == [me + head + "securityContext.runAsUser: '1000' is not of type 'integer'"]
    bad = copy.deepcopy(job); pod(bad)["containers"][0]["resources"]["limits"]["cpu"] = "lots"
    assert [e for e in errors(bad) if (head + "containers[0].resources.limits.cpu: 'lots'") in e]

    cluster = _one(base_docs, "RayCluster", "mar3d")
    assert V.schema_errors(cluster) == []
    bad = copy.deepcopy(cluster); bad["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "16"
    assert V.schema_errors(bad) == ["RayCluster/mar3d (base/ray/raycluster.yaml): "
                                    "spec.workerGroupSpecs[0].maxReplicas: '16' is not of type 'integer'"]

    dep = _one(base_docs, "Deployment", "mlflow")
    assert V.schema_errors(dep) == []
    me = "Deployment/mlflow (base/mlflow/deployment.yaml): "
    bad = copy.deepcopy(dep); bad["spec"]["replica"] = 2
    assert errors(bad) == [me + "spec: Additional properties are not allowed ('replica' was unexpected)"]
    bad = copy.deepcopy(dep); bad["spec"]["replicas"] = "2"
    assert errors(bad) == [me + "spec.replicas: '2' is not of type 'integer', 'null'"]
    bad = copy.deepcopy(dep); bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "5000"
    assert errors(bad) == [me + "spec.template.spec.containers[0].ports[0].containerPort: '5000' is not of type 'integer'"]
    bad = copy.deepcopy(dep); del bad["spec"]["selector"]
    assert errors(bad) == [me + "spec: 'selector' is a required property"]
    bad = copy.deepcopy(dep); bad["apiVersion"] = "apps/v1beta1"  # removed in Kubernetes 1.16
    assert any("Couldn't find schema for kind Deployment with api version apps/v1beta1" in e for e in errors(bad))
    assert V.schema_errors({"apiVersion": "v1", "kind": "Frobnicator", "metadata": {"name": "x"}})


def test_a_broken_overlay_is_refused_by_the_cli_naming_the_fields(tmp_path):
    """End to end through ``python k8s/validate.py``: kubectl renders a kustomization whose
    patches break a RayCluster (wrong type), the Deployment (unknown field) and the Service
    (wrong type). kubernetes-validate reports the first error of each standard object."""
    kdir = _overlay(tmp_path, [
        ({"kind": "RayCluster", "name": "mar3d"},
         [{"op": "replace", "path": "/spec/workerGroupSpecs/0/minReplicas", "value": "zero"}]),
        ({"kind": "Deployment", "name": "mlflow"},
         [{"op": "add", "path": "/spec/replica", "value": 2}]),
        ({"kind": "Service", "name": "mlflow"},
         [{"op": "replace", "path": "/spec/ports/0/port", "value": "5000"}]),
    ])
    proc = subprocess.run([sys.executable, str(K8S / "validate.py"), str(kdir)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert "RayCluster/mar3d (base/ray/raycluster.yaml): spec.workerGroupSpecs[0].minReplicas: 'zero' is not of type 'integer'" in out
    assert "Deployment/mlflow (base/mlflow/deployment.yaml): spec: Additional properties are not allowed ('replica' was unexpected)" in out
    assert "Service/mlflow (base/mlflow/service.yaml): spec.ports[0].port: '5000' is not of type 'integer'" in out
    assert "base/ray/rayjob" not in out  # only the broken objects are reported
    help_text = subprocess.run([sys.executable, str(K8S / "validate.py"), "--help"],
                               capture_output=True, text=True, check=True).stdout
    assert "kubectl kustomize" in help_text and "--crds" in help_text and "--kube-version" in help_text


def test_missing_crds_fail_naming_the_path(tmp_path, capsys, base_docs):
    missing = tmp_path / "no-crds-here"
    assert V.main(["--crds", str(missing), "base"]) == 2
    assert str(missing) in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        V.schema_errors(_one(base_docs, "RayJob", "mar3d-train-vae"), crds_dir=missing)
# ------------------------------------------------------------------ policy

def test_every_pod_is_non_root_limited_and_gpu_groups_ask_for_gpus(base_docs):
    pods = [(d, label, t, gpu) for d in base_docs for label, t, gpu in V.pod_templates(d)]
    # head + 2 groups, 6 jobs x (head + group + submitter), mlflow, its users Job
    assert len(pods) == 3 + 6 * 3 + 1 + 1
    for d, label, tmpl, gpu in pods:
        spec = tmpl["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        for c in spec["containers"]:
            limits, requests = c["resources"]["limits"], c["resources"]["requests"]
            assert {"cpu", "memory"} <= set(limits) and {"cpu", "memory"} <= set(requests)
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["runAsNonRoot"] is True
            assert ("nvidia.com/gpu" in limits) == gpu, f"{d['metadata']['name']} {label}"
    gpu_jobs = {d["metadata"]["name"] for d, _, _, gpu in pods if gpu and d["kind"] == "RayJob"}
    assert gpu_jobs == {"mar3d-train-vae", "mar3d-train-lr", "mar3d-train-hr", "mar3d-evaluate", "mar3d-generate"}


def test_nobody_reaches_ray_or_mlflow_without_credentials(base_docs):
    """Token authentication on every Ray cluster (long-lived and each RayJob's own), the
    submitters given the token from the Secret, MLflow's basic-auth app; the validator
    refuses a manifest that drops any of them."""
    for doc in base_docs:
        assert V.auth_errors(doc) == [], doc["metadata"]["name"]
    cluster, job = _one(base_docs, "RayCluster", "mar3d"), _one(base_docs, "RayJob", "mar3d-train-vae")
    mlflow = _one(base_docs, "Deployment", "mlflow")
    assert cluster["spec"]["authOptions"] == {"mode": "token", "secretName": "mar3d-ray-auth"}
    bad = copy.deepcopy(cluster); del bad["spec"]["authOptions"]
    assert any("spec.authOptions must be mode token" in e for e in V.policy_errors(bad))
    bad = copy.deepcopy(job); bad["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "disabled"
    assert any("rayClusterSpec.authOptions" in e for e in V.policy_errors(bad))
    bad = copy.deepcopy(job)
    bad["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["env"] = []
    assert any("RAY_AUTH_TOKEN must come from Secret" in e for e in V.policy_errors(bad))
    bad = copy.deepcopy(mlflow)
    bad["spec"]["template"]["spec"]["containers"][0]["args"] = ["server", "--host", "0.0.0.0"]
    assert any("--app-name basic-auth" in e for e in V.policy_errors(bad))
    # Ray pods log in to MLflow with the pipeline's account, from its Secret.
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert V._secret_env(head, "MLFLOW_TRACKING_PASSWORD") == "mar3d-mlflow-pipeline"


def test_policy_catches_violations(base_docs):
    job = _one(base_docs, "RayJob", "mar3d-train-vae")
    assert V.policy_errors(job) == []
    ctr = lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]  # noqa: E731

    bad = copy.deepcopy(job); del ctr(bad)["resources"]["limits"]["memory"]
    assert any("resources.limits.memory missing" in e for e in V.policy_errors(bad))
    bad = copy.deepcopy(job); del ctr(bad)["resources"]["limits"]["nvidia.com/gpu"]
    assert any("GPU group without" in e for e in V.policy_errors(bad))
    bad = copy.deepcopy(job); ctr(bad)["securityContext"]["allowPrivilegeEscalation"] = True
    assert any("allowPrivilegeEscalation" in e for e in V.policy_errors(bad))
    bad = copy.deepcopy(job); del bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["securityContext"]["runAsNonRoot"]
    assert any("runAsNonRoot" in e for e in V.policy_errors(bad))
    bad = copy.deepcopy(job); ctr(bad)["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"})
    assert any("inlined" in e for e in V.policy_errors(bad))
    bad = copy.deepcopy(job); ctr(bad)["env"].append({"name": "DB", "value": "postgresql://u:pw@db/mlflow"})
    assert any("credentials in a URI" in e for e in V.policy_errors(bad))
    bad = copy.deepcopy(job); ctr(bad)["image"] = "ghcr.io/mar3d/mar3d:latest"
    assert any("non-latest" in e for e in V.policy_errors(bad))
    bad = copy.deepcopy(job); bad["spec"]["shutdownAfterJobFinishes"] = False
    assert any("shutdownAfterJobFinishes" in e for e in V.policy_errors(bad))
    bad = copy.deepcopy(job); del bad["spec"]["ttlSecondsAfterFinished"]
    assert any("ttlSecondsAfterFinished" in e for e in V.policy_errors(bad))
    bad = copy.deepcopy(job); bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = 3
    assert any("MAR3D_NUM_WORKERS=2 but the worker groups have 3" in e for e in V.policy_errors(bad))
    bad = copy.deepcopy(job); bad["spec"]["runtimeEnvYAML"] = "env_vars: {MAR3D_NUM_WORKERS: '2'}"
    assert any("runtimeEnvYAML env_vars does not set them" in e for e in V.policy_errors(bad))
    bad = copy.deepcopy(job); bad["spec"]["submissionMode"] = "K8sMode"  # the CRD takes any string
    assert V.schema_errors(bad) == [] and any("submissionMode 'K8sMode'" in e for e in V.policy_errors(bad))
    assert V.policy_errors({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
                            "stringData": {"password": "x"}})


def test_rayjobs_clean_up_and_run_mar3d(base_docs):
    jobs = [d for d in base_docs if d["kind"] == "RayJob"]
    assert {j["metadata"]["name"] for j in jobs} == {
        "mar3d-prepare", "mar3d-train-vae", "mar3d-train-lr", "mar3d-train-hr", "mar3d-evaluate", "mar3d-generate"}
    for j in jobs:
        spec = j["spec"]
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
        assert spec["activeDeadlineSeconds"] > 0 and spec["submissionMode"] == "K8sJobMode"
        assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"


def test_training_rayjobs_use_training_config_keys(base_docs):
    """The `--set` keys in the training RayJobs exist in TrainConfig."""
    train_config = pytest.importorskip("mar3d.train.config")
    for stage in ("vae", "lr", "hr"):
        overrides = re.findall(r"--set (\S+)", V.expand_entrypoint(_one(base_docs, "RayJob", f"mar3d-train-{stage}")["spec"]))
        cfg = train_config.load_train_config(stage, None, overrides)
        assert cfg.stage == stage and cfg.num_workers == 2 and cfg.use_gpu is True


@pytest.mark.parametrize("target", TARGETS)
def test_config_files_named_by_rayjobs_ship_in_the_image(target):
    """RayJobs name config presets, which ship inside the installed mar3d package (package
    data, see test_training_image_installs_the_project_with_the_lock)."""
    presets = pytest.importorskip("mar3d.config").presets()
    refs = [(job["metadata"]["name"], ref) for job in V.render(K8S / target) if job["kind"] == "RayJob"
            for ref in re.findall(r"--config (\S+)", V.expand_entrypoint(job["spec"]))]
    assert refs
    missing = [f"{name}: {ref}" for name, ref in refs if ref not in presets]
    assert not missing, f"config presets not in mar3d/configs: {missing}"


# ------------------------------------------------------------------ RBAC and secrets

def test_pipeline_role_is_least_privilege(base_docs):
    role = _one(base_docs, "Role", "mar3d-pipeline-rayjobs")
    assert V.rbac_errors(role) == []
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"]) for r in role["rules"]}
    assert rules == {(("ray.io",), ("rayjobs",)): {"create", "get", "list", "watch"},
                     (("ray.io",), ("rayjobs/status",)): {"get"}}
    for extra in ({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
                  {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["*"]}):
        bad = copy.deepcopy(role); bad["rules"].append(extra)
        assert V.rbac_errors(bad)
    binding = _one(base_docs, "RoleBinding", "mar3d-pipeline-rayjobs")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "mar3d-pipeline", "namespace": "mar3d"}]
    assert not [d for d in base_docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding", "Secret")]
    # Ray and MLflow pods get no API token at all
    for d in base_docs:
        for _, tmpl, _ in V.pod_templates(d):
            assert tmpl["spec"]["automountServiceAccountToken"] is False


def test_mlflow_takes_credentials_from_secrets_only(base_docs):
    dep = _one(base_docs, "Deployment", "mlflow")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-db", "key": "backend-store-uri"}
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith("s3://")
    assert c["envFrom"] == [{"secretRef": {"name": "mlflow-s3"}}]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    svc = _one(base_docs, "Service", "mlflow")
    assert svc["spec"]["selector"] == dep["spec"]["template"]["metadata"]["labels"]


def test_ray_head_is_reachable_only_from_ray_and_pipeline_pods(base_docs):
    policy = _one(base_docs, "NetworkPolicy", "mar3d-ray-ingress")
    sources = [f["podSelector"]["matchLabels"] for rule in policy["spec"]["ingress"] for f in rule["from"]]
    assert sources == [{"app.kubernetes.io/name": "mar3d-ray"}, {"pipelines.kubeflow.org/v2_component": "true"}]
    cluster = _one(base_docs, "RayCluster", "mar3d")
    assert cluster["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == "mar3d-ray"
    settings = _one(base_docs, "ConfigMap", "mar3d-settings")
    assert settings["data"]["RAY_ADDRESS"] == "http://mar3d-head-svc.mar3d.svc.cluster.local:8265"


# ------------------------------------------------------------------ infra/

def _dockerfile(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, rest = line.partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("path", ["Dockerfile", "mlflow/Dockerfile"])
def test_dockerfiles_pin_bases_and_drop_root(path):
    instrs = _dockerfile(INFRA / path)
    froms = [rest.split()[0] for instr, rest in instrs if instr == "FROM"]
    assert froms
    for image in froms:
        if "@sha256:" not in image:
            assert re.search(r":[\w.-]*\d[\w.-]*$", image), f"{image} has no pinned version tag"
        assert not image.endswith(":latest")
    users = [rest for instr, rest in instrs if instr == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "final stage must not run as root"
    assert not any(instr == "ADD" and "http" in rest for instr, rest in instrs)
    installs = [rest for instr, rest in instrs if instr == "RUN" and "pip install" in rest]
    assert installs and all("--no-cache-dir" in r for r in installs)
    assert all(re.search(r"(-c|--constraint|-r|--requirement)\s+\S*(requirements|constraints)", r) for r in installs), (
        "every pip install must be pinned by a lock/constraints file")


def test_training_image_installs_the_project_with_the_lock():
    instrs = _dockerfile(INFRA / "Dockerfile")
    froms = [rest for instr, rest in instrs if instr == "FROM"]
    assert any("nvidia/cuda" in f and "cudnn" in f for f in froms)
    runs = " ".join(rest for instr, rest in instrs if instr == "RUN")
    assert "pip install" in runs and "requirements.lock" in runs and re.search(r"pip install .*\s\.(\s|$)", runs)
    # The config presets ship as package data of the installed mar3d package.
    assert ("COPY", "mar3d /opt/mar3d/mar3d") in instrs, "the package (with its configs) must ship in the image"
    shipped = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["mar3d"]
    assert {"configs/*.yaml", "configs/pipeline/*.yaml", "viewer/page.html"} <= set(shipped), \
        "configs and the pages' template must ship in the image"


@pytest.mark.parametrize("lock", ["requirements.lock", "mlflow/requirements.lock"])
def test_lock_files_pin_every_package(lock):
    lines = [ln.split("#")[0].strip() for ln in (INFRA / lock).read_text().splitlines()]
    pins = [ln for ln in lines if ln and not ln.startswith("--")]
    assert pins
    for ln in pins:
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+(\[[\w,\-]+\])?==[\w.+\-!]+", ln), f"{lock}: {ln!r} is not an exact pin"
    names = [re.split(r"[\[=]", ln)[0].lower().replace("_", "-") for ln in pins]
    assert len(names) == len(set(names)), f"{lock}: duplicate pins"


def test_training_lock_pins_what_the_project_needs():
    pins = {re.split(r"[\[=]", ln)[0].lower().replace("_", "-"): ln.split("==")[1]
            for ln in (INFRA / "requirements.lock").read_text().splitlines() if "==" in ln and not ln.startswith("#")}
    for needed in ("torch", "ray", "deepspeed", "mlflow", "kfp", "pyarrow", "trimesh", "open-clip-torch", "timm"):
        assert needed in pins, needed
    assert "mar3d" not in pins  # the project itself is installed from source


def test_ray_cluster_config_is_consistent():
    cfg = yaml.safe_load((INFRA / "ray/cluster.yaml").read_text())
    for key in ("cluster_name", "max_workers", "provider", "available_node_types", "head_node_type", "docker"):
        assert key in cfg, key
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert sum(t.get("max_workers", 0) for n, t in types.items() if n != cfg["head_node_type"]) <= cfg["max_workers"]
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())
    image = cfg["docker"]["image"]
    assert ":" in image and not image.endswith(":latest")
    assert cfg["docker"].get("run_options") and not any("privileged" in o for o in cfg["docker"]["run_options"])
