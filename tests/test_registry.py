"""Registry, gate and promotion against a real `mlflow server` on 127.0.0.1."""
from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mar3d.config import load_config
from mar3d.gate import GateConfig, evaluate_gate
from mar3d.registry import (PromoteConfig, RegistryConfig, RegistryError, download_release, find_release,
                            get_release, promote, record_metrics)
from mar3d.uris import validate_model_uri

from _registry_helpers import make_release


# The champion and absolute rules on their own (no baseline numbers): beat_baseline=False.
# The mean-shape floor has its own tests below.
def test_gate_passes_within_tolerance_and_refuses_beyond():
    gate = GateConfig(metrics={"f_score": "max", "chamfer": "min"}, rel_tolerance=0.1, group="",
                      beat_baseline=False)
    champ = {"f_score": 0.8, "chamfer": 0.1}
    ok = evaluate_gate({"f_score": 0.75, "chamfer": 0.105}, champ, gate)
    assert ok.passed, ok.table()
    bad = evaluate_gate({"f_score": 0.70, "chamfer": 0.105}, champ, gate)
    assert not bad.passed
    failed = [c.metric for c in bad.checks if not c.passed]
    assert failed == ["f_score"]
    assert bad.checks[0].limit == pytest.approx(0.72)


def test_gate_without_champion_applies_absolute_floors():
    gate = GateConfig(metrics={"f_score": "max"}, minimums={"f_score": 0.2}, group="",
                      beat_baseline=False)
    assert evaluate_gate({"f_score": 0.3}, None, gate).passed
    assert not evaluate_gate({"f_score": 0.1}, None, gate).passed
    assert not evaluate_gate({"f_score": float("nan")}, None, gate).passed
    assert not evaluate_gate({}, None, gate).passed


def test_gate_reads_its_group_and_refuses_without_comparable_champion():
    gate = GateConfig(metrics={"f_score": "max"}, rel_tolerance=0.0,  # group: heldout_objects
                      beat_baseline=False)
    cand = {"heldout_objects/f_score": 0.4, "seen_view/f_score": 0.9}
    assert evaluate_gate(cand, {"heldout_objects/f_score": 0.5}, gate).passed is False
    assert evaluate_gate(cand, {"heldout_objects/f_score": 0.3, "seen_view/f_score": 0.99}, gate).passed
    seen = GateConfig(metrics={"f_score": "max"}, rel_tolerance=0.0, group="seen_view",
                      beat_baseline=False)
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

    # Every release here clears its mean-shape baseline: this test is about the champion.
    base = {"heldout_objects/baseline/f_score": 0.3, "heldout_objects/baseline/chamfer": 0.3}
    a = make_release(tmp_path, "a", {"heldout_objects/f_score": 0.6, "heldout_objects/chamfer": 0.2,
                                     **base}, cfg)
    assert get_release("models:/mar3d-test@candidate").version == a.version
    dirs = download_release(a, tmp_path / "dl")
    assert set(dirs) == {"vae", "cond", "lr", "hr"}
    assert (dirs["hr"] / "model.safetensors").is_file()

    decision = promote(a.uri, gate=gate, cfg=cfg, reason="first release")
    assert decision.passed
    assert get_release("models:/mar3d-test@champion").version == a.version
    assert client.get_model_version_by_alias("mar3d-test-vae", "champion").version == a.components["vae"][1]

    b = make_release(tmp_path, "b", {"heldout_objects/f_score": 0.4, "heldout_objects/chamfer": 0.2,
                                     **base}, cfg)
    refused = promote(b.uri, gate=gate, cfg=cfg, reason="worse model")
    assert not refused.passed
    assert "heldout_objects/f_score" in refused.table() and "NO" in refused.table()
    assert "worse than champion" in refused.table()
    assert get_release("models:/mar3d-test@champion").version == a.version

    # Better numbers measured on other objects are not comparable: refused, with the reason.
    c = make_release(tmp_path, "c", {"heldout_objects/f_score": 0.9, "heldout_objects/chamfer": 0.1,
                                     **base}, cfg,
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


# ------------------------------------------------------------- the mean-shape floor
FLOOR = GateConfig()  # the defaults: heldout_objects, f_score/chamfer/normal_consistency, beat_baseline
BASELINE = {"heldout_objects/baseline/f_score": 0.165, "heldout_objects/baseline/chamfer": 0.203,
            "heldout_objects/baseline/normal_consistency": 0.60}


def _scores(f_score: float, chamfer: float, normal_consistency: float, prefix: str = "") -> dict:
    return {f"heldout_objects/{prefix}f_score": f_score, f"heldout_objects/{prefix}chamfer": chamfer,
            f"heldout_objects/{prefix}normal_consistency": normal_consistency}


def _failed(decision) -> dict[str, str]:
    return {c.metric.rsplit("/", 1)[-1]: c.why for c in decision.checks if not c.passed}


def test_gate_refuses_a_first_release_below_the_mean_shape_baseline_and_says_by_how_much():
    below = {**_scores(0.162, 0.15, 0.7), **BASELINE}  # F-score 0.003 under the baseline
    decision = evaluate_gate(below, None, FLOOR)
    assert not decision.passed, decision.table()
    assert _failed(decision) == {"f_score": "f_score 0.162 is 0.003 below the mean-shape baseline "
                                            "0.165; no champion value"}
    f_score = decision.checks[0]
    assert (f_score.candidate, f_score.baseline, f_score.champion) == (0.162, 0.165, None)
    # The table shows the baseline next to the candidate, and why each row passed.
    table = decision.table()
    assert "| mean-shape baseline |" in table.splitlines()[0]
    assert "| heldout_objects/f_score | max | 0.162 | 0.165 | - | - | NO |" in table
    assert "beats the mean-shape baseline 0.203 by 0.053" in table
    assert "beats the mean-shape baseline 0.600 by 0.100" in table


def test_gate_floor_on_min_metrics_says_above():
    worse = {**_scores(0.3, 0.246, 0.7), **BASELINE}  # Chamfer 0.043 over the baseline
    decision = evaluate_gate(worse, None, FLOOR)
    assert not decision.passed
    assert _failed(decision) == {"chamfer": "chamfer 0.246 is 0.043 above the mean-shape baseline "
                                            "0.203; no champion value"}
    # Small gaps get the decimals that show them.
    close = {**_scores(0.3, 0.20342, 0.7), **BASELINE}
    assert "chamfer 0.2034 is 0.0004 above the mean-shape baseline 0.2030" in evaluate_gate(
        close, None, FLOOR).table()


def test_gate_floor_needs_strictly_better():
    tied = {**_scores(0.165, 0.15, 0.7), **BASELINE}
    decision = evaluate_gate(tied, None, FLOOR)
    assert not decision.passed
    assert _failed(decision)["f_score"].startswith("f_score 0.165 equals the mean-shape baseline 0.165")


def test_gate_refuses_beating_the_champion_but_not_the_baseline():
    # Better than the champion on every metric, but the champion itself is below the
    # mean shape: the floor still refuses (both must hold).
    cand = {**_scores(0.16, 0.21, 0.65), **BASELINE}
    champion = _scores(0.10, 0.30, 0.50)
    decision = evaluate_gate(cand, champion, FLOOR)
    assert not decision.passed
    assert _failed(decision) == {
        "f_score": "f_score 0.160 is 0.005 below the mean-shape baseline 0.165; within tolerance of champion",
        "chamfer": "chamfer 0.210 is 0.007 above the mean-shape baseline 0.203; within tolerance of champion"}
    assert [c.passed for c in decision.checks] == [False, False, True]
    # ... and the other way round: above the baseline, but worse than the champion.
    worse_than_champion = evaluate_gate({**_scores(0.3, 0.1, 0.7), **BASELINE},
                                        _scores(0.5, 0.1, 0.7), FLOOR)
    assert _failed(worse_than_champion) == {
        "f_score": "worse than champion beyond tolerance; beats the mean-shape baseline 0.165 by 0.135"}


def test_gate_passes_beating_both_and_says_so():
    cand = {**_scores(0.185, 0.15, 0.7), **BASELINE}
    decision = evaluate_gate(cand, _scores(0.18, 0.155, 0.69), FLOOR)
    assert decision.passed, decision.table()
    assert [c.why for c in decision.checks] == [
        "beats the mean-shape baseline 0.165 by 0.020; within tolerance of champion",
        "beats the mean-shape baseline 0.203 by 0.053; within tolerance of champion",
        "beats the mean-shape baseline 0.600 by 0.100; within tolerance of champion"]
    first = evaluate_gate(cand, None, FLOOR)  # no champion yet: the floor alone
    assert first.passed and first.checks[0].why == "beats the mean-shape baseline 0.165 by 0.020; no champion value"


def test_gate_refuses_without_baseline_numbers():
    decision = evaluate_gate(_scores(0.9, 0.01, 0.99), None, FLOOR)
    assert not decision.passed
    assert all("no mean-shape baseline value (heldout_objects/baseline/" in c.why
               and "EvalConfig.baseline" in c.why and "gate.beat_baseline=false" in c.why
               for c in decision.checks), decision.table()
    # A baseline of another group does not count.
    other = {f"seen_view/baseline/{m}": v for m, v in (("f_score", 0.1), ("chamfer", 0.9),
                                                       ("normal_consistency", 0.1))}
    assert not evaluate_gate({**_scores(0.9, 0.01, 0.99), **other}, None, FLOOR).passed
    # group "" reads plain names: baseline/<metric>.
    plain = GateConfig(metrics={"f_score": "max"}, group="")
    assert plain.baseline_key("f_score") == "baseline/f_score"
    assert not evaluate_gate({"f_score": 0.3}, None, plain).passed
    assert evaluate_gate({"f_score": 0.3, "baseline/f_score": 0.2}, None, plain).passed


def test_beat_baseline_false_restores_the_old_gate():
    off = GateConfig(beat_baseline=False)
    below = {**_scores(0.162, 0.246, 0.5), **BASELINE}
    decision = evaluate_gate(below, None, off)
    assert decision.passed, decision.table()
    assert [c.why for c in decision.checks] == ["no champion value"] * 3
    assert decision.checks[0].baseline == 0.165  # still shown
    assert evaluate_gate(_scores(0.162, 0.246, 0.5), None, off).passed  # none recorded: fine
    champion = _scores(0.2, 0.2, 0.6)
    assert not evaluate_gate(below, champion, off).passed  # the champion rule is unchanged


def test_beat_baseline_is_a_promote_setting():
    assert PromoteConfig().gate.beat_baseline is True
    cfg = load_config(PromoteConfig, None, ["gate.beat_baseline=false"])
    assert cfg.gate.beat_baseline is False
    assert load_config(PromoteConfig, None, ["gate.beat_baseline=true"]).gate.beat_baseline is True


def _promotion_runs(client: MlflowClient, name: str) -> list:
    exp = client.get_experiment_by_name("mar3d-promotions")
    return [r for r in client.search_runs([exp.experiment_id], "tags.`mar3d.kind` = 'promotion'")
            if r.data.tags["candidate"].startswith(f"models:/{name}/")]  # server is shared


@pytest.mark.e2e
def test_first_release_below_its_baseline_is_refused(mlflow_server, tmp_path):
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment("test-registry-floor")
    cfg = RegistryConfig(name="mar3d-floor-refused")  # a fresh registry: no champion
    client = MlflowClient()
    release = make_release(tmp_path, "a", {**_scores(0.162, 0.15, 0.7), **BASELINE}, cfg)

    decision = promote(release.uri, cfg=cfg, reason="first release")  # the default gate
    assert not decision.passed
    assert "f_score 0.162 is 0.003 below the mean-shape baseline 0.165" in decision.table()
    assert find_release(cfg.name, cfg.champion_alias) is None
    for comp in ("vae", "lr", "hr"):  # no component alias moved either
        with pytest.raises(MlflowException):
            client.get_model_version_by_alias(cfg.component_name(comp), cfg.champion_alias)
    [run] = _promotion_runs(client, cfg.name)
    assert run.data.tags["decision"] == "refused"
    assert run.data.tags["champion_before"] == "none"
    assert run.data.params["beat_baseline"] == "True"
    gate_md = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/gate.md")
    assert "0.003 below the mean-shape baseline" in gate_md


@pytest.mark.e2e
def test_first_release_above_its_baseline_is_promoted(mlflow_server, tmp_path):
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment("test-registry-floor")
    cfg = RegistryConfig(name="mar3d-floor-promoted")
    client = MlflowClient()
    release = make_release(tmp_path, "a", {**_scores(0.185, 0.15, 0.7), **BASELINE}, cfg)

    decision = promote(release.uri, cfg=cfg, reason="first release")
    assert decision.passed, decision.table()
    assert "beats the mean-shape baseline 0.165 by 0.020" in decision.table()
    assert get_release(f"models:/{cfg.name}@champion").version == release.version
    [run] = _promotion_runs(client, cfg.name)
    assert run.data.tags["decision"] == "promoted"
