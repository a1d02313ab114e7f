"""MLflow artifacts of a SQLite store stay beside its database (the work folder), not in
./mlruns of whatever folder a command was started from; a tracking server still decides
where its artifacts go."""
from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from mar3d import tracking
from mar3d.registry import RegistryConfig, register_release, resolve_model_dir


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """Commands run from an unrelated folder; MLflow's global URI is restored after."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    previous = mlflow.get_tracking_uri()
    yield cwd
    mlflow.set_tracking_uri(previous)


def _log_model_run(uri: str, tmp_path: Path, experiment: str) -> str:
    model = tmp_path / "model-files"
    model.mkdir(exist_ok=True)
    (model / "config.yaml").write_text("kind: vae\n")
    run_id = tracking.start_or_resume_run(uri, experiment, "train-vae")
    tracking.log_artifacts(uri, run_id, model, "model")
    tracking.end_run(uri, run_id)
    return run_id


def test_sqlite_artifacts_and_releases_stay_in_the_work_folder(tmp_path, elsewhere):
    work = tmp_path / "work"
    work.mkdir()
    uri = f"sqlite:///{work / 'mlflow.db'}"
    run_id = _log_model_run(uri, tmp_path, "mar3d")
    model = f"runs:/{run_id}/model"  # where artifacts go, not what they hold, is under test
    release = register_release({"vae": model, "cond": model, "lr": model},
                               cfg=RegistryConfig(name="mar3d-loc"), tracking_uri=uri)

    assert list(elsewhere.iterdir()) == []  # no ./mlruns (nor anything else) where we stand
    # The registry passes its URI to each client: MLflow's process-wide URI is untouched.
    assert mlflow.get_tracking_uri() != uri
    assert (work / "mlartifacts" / "mar3d" / run_id / "artifacts" / "model" / "config.yaml").is_file()
    assert list((work / "mlartifacts" / "mar3d-promotions").rglob("release.json"))
    client = tracking.client(uri)
    for name in ("mar3d", "mar3d-promotions"):
        location = client.get_experiment_by_name(name).artifact_location
        assert location == (work / "mlartifacts" / name).as_uri()
    # The registered versions resolve to files inside the work folder.
    for name, version in [(release.name, release.version), *release.components.values()]:
        local = resolve_model_dir(f"models:/{name}/{version}", uri, tmp_path / f"dl-{name}")
        assert any(local.rglob("*.json")) or any(local.rglob("*.yaml"))
        run = client.get_run(client.get_model_version(name, version).run_id)
        assert run.info.artifact_uri.startswith((work / "mlartifacts").as_uri())


def test_an_existing_experiment_keeps_its_location(tmp_path, elsewhere):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    old = (tmp_path / "old-artifacts").as_uri()
    exp_id = client.create_experiment("mar3d", artifact_location=old)
    assert tracking.ensure_experiment(uri, "mar3d") == exp_id
    assert client.get_experiment(exp_id).artifact_location == old


def test_a_server_keeps_its_own_artifact_root(mlflow_server, tmp_path, elsewhere):
    run_id = _log_model_run(mlflow_server, tmp_path, "mar3d-server-location")
    client = tracking.client(mlflow_server)
    location = client.get_experiment_by_name("mar3d-server-location").artifact_location
    assert location.startswith("mlflow-artifacts:")  # what `mlflow server` chose, untouched
    assert tracking.list_artifacts(mlflow_server, run_id, "model") == ["model/config.yaml"]
    assert list(elsewhere.iterdir()) == []
