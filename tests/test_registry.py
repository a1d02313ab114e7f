"""Registry, gate and promotion against a real `mlflow server` on 127.0.0.1."""
from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient

from mar3d.registry import (GateConfig, RegistryConfig, RegistryError, download_release,
                            evaluate_gate, get_release, promote, record_metrics)
from mar3d.uris import validate_model_uri

from _registry_helpers import make_release


def test_gate_passes_within_tolerance_and_refuses_beyond():
    gate = GateConfig(metrics={"f_score": "max", "chamfer": "min"}, rel_tolerance=0.1, group="")
    champ = {"f_score": 0.8, "chamfer": 0.1}
    ok = evaluate_gate({"f_score": 0.75, "chamfer": 0.105}, champ, gate)
    assert ok.passed, ok.table()
    bad = evaluate_gate({"f_score": 0.70, "chamfer": 0.105}, champ, gate)
    assert not bad.passed
    failed = [c.metric for c in bad.checks if not c.passed]
    assert failed == ["f_score"]
    assert bad.checks[0].limit == pytest.approx(0.72)


def test_gate_without_champion_applies_absolute_floors():
    gate = GateConfig(metrics={"f_score": "max"}, minimums={"f_score": 0.2}, group="")
    assert evaluate_gate({"f_score": 0.3}, None, gate).passed
    assert not evaluate_gate({"f_score": 0.1}, None, gate).passed
    assert not evaluate_gate({"f_score": float("nan")}, None, gate).passed
    assert not evaluate_gate({}, None, gate).passed


def test_gate_reads_its_group_and_refuses_without_comparable_champion():
    gate = GateConfig(metrics={"f_score": "max"}, rel_tolerance=0.0)  # group: heldout_objects
    cand = {"heldout_objects/f_score": 0.4, "seen_view/f_score": 0.9}
    assert evaluate_gate(cand, {"heldout_objects/f_score": 0.5}, gate).passed is False
    assert evaluate_gate(cand, {"heldout_objects/f_score": 0.3, "seen_view/f_score": 0.99}, gate).passed
    seen = GateConfig(metrics={"f_score": "max"}, rel_tolerance=0.0, group="seen_view")
    assert not evaluate_gate(cand, {"seen_view/f_score": 0.95}, seen).passed
    missing = evaluate_gate(cand, None, gate, champion_missing="not scored on the same objects")
    assert not missing.passed and "same objects" in missing.table()


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


@pytest.mark.e2e
def test_register_promote_and_refuse(mlflow_server, tmp_path):
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment("test-registry")
    for t in ("a", "b"):
        (tmp_path / t).mkdir()
    cfg = RegistryConfig(name="mar3d-test")
    gate = GateConfig(metrics={"f_score": "max", "chamfer": "min"}, rel_tolerance=0.05)
    client = MlflowClient()

    a = make_release(tmp_path, "a", {"heldout_objects/f_score": 0.6, "heldout_objects/chamfer": 0.2}, cfg)
    assert get_release("models:/mar3d-test@candidate").version == a.version
    dirs = download_release(a, tmp_path / "dl")
    assert set(dirs) == {"vae", "lr", "hr"}
    assert (dirs["hr"] / "model.safetensors").is_file()

    decision = promote(a.uri, gate=gate, cfg=cfg, reason="first release")
    assert decision.passed
    assert get_release("models:/mar3d-test@champion").version == a.version
    assert client.get_model_version_by_alias("mar3d-test-vae", "champion").version == a.components["vae"][1]

    b = make_release(tmp_path, "b", {"heldout_objects/f_score": 0.4, "heldout_objects/chamfer": 0.2}, cfg)
    refused = promote(b.uri, gate=gate, cfg=cfg, reason="worse model")
    assert not refused.passed
    assert "heldout_objects/f_score" in refused.table() and "NO" in refused.table()
    assert "worse than champion" in refused.table()
    assert get_release("models:/mar3d-test@champion").version == a.version

    # Better numbers measured on other objects are not comparable: refused, with the reason.
    c = make_release(tmp_path, "c", {"heldout_objects/f_score": 0.9, "heldout_objects/chamfer": 0.1}, cfg,
                     tags={"eval.heldout_objects.protocol": "other-objects"})
    other = promote(c.uri, gate=gate, cfg=cfg, reason="evaluated elsewhere")
    assert not other.passed and "--compare-to" in other.table()
    # The champion scored inside the candidate's own evaluation is what the gate uses.
    c = record_metrics(c, {"heldout_objects/champion/f_score": 0.5, "heldout_objects/champion/chamfer": 0.3},
                       tags={"eval.heldout_objects.champion": f"models:/mar3d-test/{a.version}"})
    assert promote(c.uri, gate=gate, cfg=cfg, reason="better on the same objects").passed
    assert get_release("models:/mar3d-test@champion").version == c.version

    exp = client.get_experiment_by_name("mar3d-promotions")
    runs = [r for r in client.search_runs([exp.experiment_id], "tags.`mar3d.kind` = 'promotion'")
            if r.data.tags["candidate"].startswith("models:/mar3d-test/")]  # server is shared
    decisions = sorted(r.data.tags["decision"] for r in runs)
    assert decisions == ["promoted", "promoted", "refused", "refused"]
    assert all(r.data.tags["actor"] for r in runs)

    with pytest.raises(RegistryError, match="not found"):
        get_release("models:/mar3d-test@nonexistent")
