"""Registry, gate and promotion against a real `mlflow server` on 127.0.0.1."""
from __future__ import annotations

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import save_file

from mar3d.registry import (GateConfig, RegistryConfig, RegistryError, download_release,
                            evaluate_gate, get_release, promote, record_metrics,
                            register_release, validate_model_uri)


def test_gate_passes_within_tolerance_and_refuses_beyond():
    gate = GateConfig(metrics={"f_score": "max", "chamfer": "min"}, rel_tolerance=0.1)
    champ = {"f_score": 0.8, "chamfer": 0.1}
    ok = evaluate_gate({"f_score": 0.75, "chamfer": 0.105}, champ, gate)
    assert ok.passed, ok.table()
    bad = evaluate_gate({"f_score": 0.70, "chamfer": 0.105}, champ, gate)
    assert not bad.passed
    failed = [c.metric for c in bad.checks if not c.passed]
    assert failed == ["f_score"]
    assert bad.checks[0].limit == pytest.approx(0.72)


def test_gate_without_champion_applies_absolute_floors():
    gate = GateConfig(metrics={"f_score": "max"}, minimums={"f_score": 0.2})
    assert evaluate_gate({"f_score": 0.3}, None, gate).passed
    assert not evaluate_gate({"f_score": 0.1}, None, gate).passed
    assert not evaluate_gate({"f_score": float("nan")}, None, gate).passed
    assert not evaluate_gate({}, None, gate).passed


@pytest.mark.parametrize("uri", ["models:/x@../../etc", "file:///etc/passwd", "runs:/abc/model",
                                 "s3://bucket/key", "models:/a b@c", "/definitely/not/a/dir"])
def test_invalid_model_uris_rejected(uri):
    with pytest.raises(ValueError):
        validate_model_uri(uri)


def test_valid_model_uris_accepted(tmp_path):
    assert validate_model_uri("models:/mar3d@champion") == "models:/mar3d@champion"
    assert validate_model_uri("models:/mar3d/3")
    assert validate_model_uri("runs:/" + "a" * 32 + "/model")
    assert validate_model_uri(str(tmp_path)) == str(tmp_path.resolve())


def _log_component(tmp_path, name: str, value: float) -> str:
    d = tmp_path / name
    d.mkdir()
    save_file({"w": torch.full((4, 4), value)}, str(d / "model.safetensors"))
    (d / "config.yaml").write_text(f"kind: {name}\n")
    with mlflow.start_run(run_name=f"train-{name}") as run:
        mlflow.log_artifacts(str(d), "model")
    return f"runs:/{run.info.run_id}/model"


def _release(tmp_path, tag: str, metrics: dict, cfg: RegistryConfig):
    uris = {c: _log_component(tmp_path / tag, c, i) for i, c in enumerate(["vae", "lr", "hr"])}
    rel = register_release(uris, cfg=cfg)
    return record_metrics(rel, metrics)


@pytest.mark.e2e
def test_register_promote_refuse_and_interrupted_promotion(mlflow_server, tmp_path):
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment("test-registry")
    for t in ("a", "b", "c"):
        (tmp_path / t).mkdir()
    cfg = RegistryConfig(name="mar3d-test")
    gate = GateConfig(metrics={"f_score": "max", "chamfer": "min"}, rel_tolerance=0.05)
    client = MlflowClient()

    a = _release(tmp_path, "a", {"f_score": 0.6, "chamfer": 0.2}, cfg)
    assert get_release("models:/mar3d-test@candidate").version == a.version
    dirs = download_release(a, tmp_path / "dl")
    assert set(dirs) == {"vae", "lr", "hr"}
    assert (dirs["hr"] / "model.safetensors").is_file()

    decision = promote(a.uri, gate=gate, cfg=cfg, reason="first release")
    assert decision.passed
    assert get_release("models:/mar3d-test@champion").version == a.version
    assert client.get_model_version_by_alias("mar3d-test-vae", "champion").version == a.components["vae"][1]

    b = _release(tmp_path, "b", {"f_score": 0.4, "chamfer": 0.2}, cfg)
    refused = promote(b.uri, gate=gate, cfg=cfg, reason="worse model")
    assert not refused.passed
    assert "f_score" in refused.table() and "NO" in refused.table()
    assert get_release("models:/mar3d-test@champion").version == a.version

    c = _release(tmp_path, "c", {"f_score": 0.7, "chamfer": 0.1}, cfg)
    with pytest.raises(RuntimeError, match="injected"):
        promote(c.uri, gate=gate, cfg=cfg, _fail_after_components=True)
    # consumers resolve through the release alias, which did not move
    assert get_release("models:/mar3d-test@champion").version == a.version
    for comp in ("vae", "lr", "hr"):
        name, version = a.components[comp]
        assert client.get_model_version_by_alias(name, "champion").version == version

    exp = client.get_experiment_by_name("mar3d-promotions")
    runs = [r for r in client.search_runs([exp.experiment_id], "tags.`mar3d.kind` = 'promotion'")
            if r.data.tags["candidate"].startswith("models:/mar3d-test/")]  # server is shared
    decisions = sorted(r.data.tags["decision"] for r in runs)
    assert decisions == ["interrupted", "promoted", "refused"]
    assert all(r.data.tags["actor"] for r in runs)

    with pytest.raises(RegistryError, match="not found"):
        get_release("models:/mar3d-test@nonexistent")
