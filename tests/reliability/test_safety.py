"""Safety: nothing untrusted is unpickled, model URIs and paths are validated, and the
Kubernetes manifests run as non-root with limits and least-privilege RBAC.

* a static scan (AST) of every Python file we ship: no pickle/cloudpickle/dill/joblib/
  marshal loads, no ``yaml.load``, no ``np.load(allow_pickle=True)``, no
  ``torch.load`` without ``weights_only=True``, no ``mlflow.pyfunc.load_model``
  (cloudpickle), no ``eval``/``exec``, no ``shell=True``;
* at run time, model folders carrying pickle payloads (as ``model.safetensors``, as a
  stray ``model.pt``, as a YAML python tag) are refused by every loader and the payload
  never runs;
* hostile model URIs are refused before any download by every entry point.

DeepSpeed's own resume state (``checkpoint/<tag>/*.pt``) is read by DeepSpeed with
``torch.load(weights_only=False)``; it is written and read only by the training job
inside its own ``storage_path`` and never crosses the registry (see README).
"""
from __future__ import annotations

import ast
import importlib.util
import pickle
from pathlib import Path

import pytest
import yaml

from mar3d.generate import GenerateConfig, batch_generate
from mar3d.inference import MAR3DPipeline
from mar3d.registry import resolve_model_dir
from mar3d.uris import validate_model_uri
from mar3d.weights import load_model_dir

from _tiny_release import write_tiny_release

REPO = Path(__file__).resolve().parents[2]
SHIPPED = ["mar3d", "components", "pipelines", "benchmarks", "infra", "k8s"]

UNSAFE_CALLS = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "cloudpickle.load", "cloudpickle.loads",
    "dill.load", "dill.loads", "joblib.load", "marshal.load", "marshal.loads", "shelve.open",
    "yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all",
    "mlflow.pyfunc.load_model", "mlflow.pytorch.load_model", "torch.jit.load", "eval", "exec",
}
UNSAFE_MODULES = {"pickle", "cloudpickle", "dill", "joblib", "marshal", "shelve"}


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    parts.append(node.id if isinstance(node, ast.Name) else "<expr>")  # x().eval() is not eval
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else "<expr>"
    return None


def scan(path: Path) -> tuple[int, int, list[str]]:
    """(calls checked, torch.load sites, violations) for one file."""
    tree = ast.parse(path.read_text(), str(path))
    calls, torch_loads, bad = 0, 0, []
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    where = lambda n: f"{shown}:{n.lineno}"  # noqa: E731
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for n in names:
                if n.split(".")[0] in UNSAFE_MODULES:
                    bad.append(f"{where(node)} imports {n}")
        if not isinstance(node, ast.Call):
            continue
        calls += 1
        name = _dotted(node.func)
        if name in UNSAFE_CALLS:
            bad.append(f"{where(node)} calls {name}")
        if name.endswith("torch.load") or name == "torch.load":
            torch_loads += 1
            if _kw(node, "weights_only") is not True:
                bad.append(f"{where(node)} torch.load without weights_only=True")
        if name.endswith("np.load") or name.endswith("numpy.load"):
            if _kw(node, "allow_pickle") not in (None, False):
                bad.append(f"{where(node)} np.load(allow_pickle=...)")
        if _kw(node, "shell") not in (None, False):
            bad.append(f"{where(node)} {name}(shell=...)")
    return calls, torch_loads, bad


def test_shipped_code_never_deserializes_untrusted_pickles(reliability_report):
    files = [p for d in SHIPPED for p in sorted((REPO / d).rglob("*.py")) if ".venv" not in p.parts]
    assert len(files) > 30
    totals = [scan(p) for p in files]
    violations = [v for _, _, bad in totals for v in bad]
    assert not violations, violations
    reliability_report.add("safety", check="static scan for unsafe deserialization / eval / shell=True",
                           scope=f"{len(files)} files, {sum(c for c, _, _ in totals)} calls",
                           result="0 violations")


def test_the_scanner_catches_what_it_looks_for(tmp_path):
    bad = tmp_path / "probe.py"
    bad.write_text("import pickle\nimport torch, yaml, numpy as np, subprocess\n"
                   "torch.load('x')\ntorch.load('x', weights_only=False)\nyaml.load(s)\n"
                   "np.load('a', allow_pickle=True)\nsubprocess.run('ls', shell=True)\neval('1')\n"
                   "torch.load('x', weights_only=True)\nyaml.safe_load(s)\n")
    calls, loads, found = scan(bad)
    assert loads == 3 and len(found) == 7, found


class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _hostile_model_dirs(root: Path, marker: Path) -> dict[str, Path]:
    payload = pickle.dumps(_Payload(marker))
    good_config = yaml.safe_dump({"format": "mar3d-weights/v1", "kind": "vae", "model": {}, "extra": {}})
    dirs = {}
    d = dirs["pickle named model.safetensors"] = root / "disguised"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(payload)
    (d / "config.yaml").write_text(good_config)
    d = dirs["only a pickled model.pt"] = root / "torch_pickle"
    d.mkdir()
    (d / "model.pt").write_bytes(payload)
    (d / "pytorch_model.bin").write_bytes(payload)
    (d / "config.yaml").write_text(good_config)
    d = dirs["YAML python tag in config.yaml"] = root / "yaml_tag"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (d / "config.yaml").write_text(f"format: mar3d-weights/v1\nkind: vae\n"
                                   f"model: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    return dirs


def test_hostile_model_folders_are_refused_and_never_executed(tmp_path, reliability_report):
    marker = tmp_path / "code_ran"
    refused = 0
    for what, d in _hostile_model_dirs(tmp_path / "models", marker).items():
        with pytest.raises(Exception) as e:
            load_model_dir(d, kind="vae")
        assert not marker.exists(), f"{what}: the payload ran"
        refused += 1
        # As a release folder (every component the same hostile folder) through the
        # inference entry point.
        release = tmp_path / f"release-{d.name}"
        for comp in ("vae", "lr", "hr"):
            (release / comp).parent.mkdir(parents=True, exist_ok=True)
            (release / comp).symlink_to(d, target_is_directory=True)
        with pytest.raises(Exception):
            MAR3DPipeline.from_pretrained(str(release), device="cpu")
        assert not marker.exists(), f"{what}: the payload ran in from_pretrained"
        refused += 1
        assert str(e.value)
    reliability_report.add("safety", check="pickle payloads in model folders (3 disguises x 2 loaders)",
                           scope=f"{refused} loads", result="all refused; payload never ran")


HOSTILE_URIS = [
    "file:///etc/passwd", "http://169.254.169.254/latest/meta-data", "https://evil.example/model",
    "s3://bucket/key", "gs://bucket/key", "hdfs://nn/path", "ftp://x/y",
    "models:/x@../../etc", "models:/a b@c", "models:/name@alias;rm -rf /", "models:/name/1/../../2",
    "models:/", "models:/name@", "runs:/abc/model", "runs:/" + "a" * 32 + "/../../etc",
    "runs:/" + "a" * 32, "/definitely/not/a/dir", "", "models:/x\x00@y", "mlflow-artifacts:/x",
    "dbfs:/x", "runs:/" + "g" * 32 + "/model",
]


def test_hostile_model_uris_are_refused_everywhere(tmp_path, reliability_report):
    refused = 0
    for uri in HOSTILE_URIS:
        with pytest.raises((ValueError, FileNotFoundError)):
            validate_model_uri(uri)
        with pytest.raises((ValueError, FileNotFoundError)):
            resolve_model_dir(uri)
        with pytest.raises((ValueError, FileNotFoundError)):
            MAR3DPipeline.from_pretrained(uri, device="cpu")
        refused += 3
    # The batch job refuses before starting anything (no Ray needed to see it).
    for uri in HOSTILE_URIS[:6]:
        with pytest.raises(ValueError):
            batch_generate(str(tmp_path), uri, str(tmp_path / "out"), GenerateConfig(), progress=False)
        refused += 1
    assert validate_model_uri("models:/mar3d@champion") and validate_model_uri(str(tmp_path))
    reliability_report.add("safety", check="hostile model URIs (file/http/s3/traversal/injection/malformed)",
                           scope=f"{len(HOSTILE_URIS)} URIs x 3 loaders + 6 through the batch job "
                           f"({refused} calls)",
                           result="all refused before any download")


def test_generated_file_names_cannot_escape_the_output(tmp_path):
    from mar3d.generate import mesh_paths
    from mar3d.storage import safe_name

    for raw in ["../x", "/etc/passwd", "a/../../b", "..", ".", "", "a//b/./c"]:
        with pytest.raises(ValueError):
            safe_name(raw)
    out = tmp_path / "out"
    for raw in ["sub/cat.png", "we ird\\name;rm -rf.png", "ü/ñ.png"]:
        for rel in mesh_paths(safe_name(raw), ("glb", "ply")):
            assert (out / rel).resolve().is_relative_to(out.resolve()), rel
    # The release folder a job writes into must not be the image input or contain it.
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match="must not be"):
        batch_generate(str(tmp_path / "images"), str(write_tiny_release(tmp_path / "rel")),
                       str(tmp_path), GenerateConfig(), progress=False)


def _k8s_validator():
    spec = importlib.util.spec_from_file_location("mar3d_k8s_validate_rel", REPO / "k8s" / "validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_k8s_manifests_non_root_limited_least_privilege(reliability_report):
    V = _k8s_validator()
    targets = {"base": REPO / "k8s" / "base", **{f"overlays/{o}": REPO / "k8s" / "overlays" / o
                                                 for o in V.OVERLAYS}}
    pods = containers = roles = 0
    for target, path in targets.items():
        docs = V.render(path)
        assert V.validate_docs(docs) == [], target
        for d in docs:
            for _, tmpl, _ in V.pod_templates(d):
                spec = tmpl["spec"]
                pods += 1
                assert spec["securityContext"]["runAsNonRoot"] is True
                assert spec["automountServiceAccountToken"] is False
                for c in spec["containers"]:
                    containers += 1
                    assert c["securityContext"]["runAsNonRoot"] is True
                    assert c["securityContext"]["allowPrivilegeEscalation"] is False
                    assert {"cpu", "memory"} <= set(c["resources"]["limits"])
            if d["kind"] == "Role":
                roles += 1
                assert V.rbac_errors(d) == []
            assert d["kind"] not in ("ClusterRole", "ClusterRoleBinding")
    reliability_report.add("safety", check="k8s: non-root, no privilege escalation, cpu/memory limits, "
                           "least-privilege RBAC, no cluster roles",
                           scope=f"{len(targets)} targets, {pods} pod templates, {containers} containers, "
                           f"{roles} roles", result="0 violations")
