"""The README's main job, smallest preset: the kfp pipeline run locally end to end, with
distinctive credentials in its environment that nothing it writes may contain."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import trimesh

from _leaks import leaks

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
STEPS = {"data prepare": "data", "train vae": "train/vae", "train lr": "train/lr",
         "train hr": "train/hr", "evaluate": "eval", "promote": "promote", "generate": "generate"}


def _assert_quiet_output_and_step_logs(proc, workdir: Path) -> None:
    """Not on a terminal the run prints a few lines per step; each step's full output is
    in its folder's step.log."""
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) <= 60, "\n".join(lines)
    (run,) = (workdir / "runs").iterdir()
    for step, folder in STEPS.items():
        log = run / folder / "step.log"
        assert f"{step}: started, log: {log}" in lines
        assert any(line.startswith(f"{step}: done in ") for line in lines), step
        text = log.read_text()
        assert f"running: mar3d {step}" in text
    # The steps' own output is in their logs, not on the console.
    assert "dataset " in (run / "data" / "step.log").read_text()  # prepare's summary line
    assert "RayTrainWorker" in (run / "train" / "vae" / "step.log").read_text()
    assert "RayTrainWorker" not in proc.stdout + proc.stderr
    assert any(line.startswith("train vae: done in ") and "60 steps, final loss" in line for line in lines)


def test_local_pipeline_end_to_end(tmp_path, ycb_small_dir):
    # 4 objects: 2 training workers x batch 2 need at least 4 shapes.
    dataset = ycb_small_dir
    workdir = tmp_path / "work"
    result_json = tmp_path / "result.json"
    # Started elsewhere: nothing may land in the folder a user happens to be in.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    # An S3 secret the run has no use for, as a user's shell may hold one: it must stay out too.
    env["AWS_SECRET_ACCESS_KEY"] = f"s3-secret-{secrets.token_hex(12)}"
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines", "pipeline", "run", "--local", "--preset", "smoke",
         "--dataset", str(dataset), "--workdir", str(workdir), "--result-json", str(result_json)],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    assert "mlflow ui --backend-store-uri" in proc.stdout
    _assert_quiet_output_and_step_logs(proc, workdir)
    assert list(cwd.iterdir()) == []  # no ./mlruns: MLflow artifacts are in the work folder
    assert list((workdir / "mlartifacts" / "mar3d").rglob("model/*.safetensors"))

    result = json.loads(result_json.read_text())
    assert result["num_meshes"] == 4
    # A rotatable 3D page per evaluation group and the generation's gallery, named in the summary.
    assert sorted(Path(p).name for p in result["pages"]) == ["gallery.html", "heldout_objects.html",
                                                             "seen_view.html"]
    assert all(Path(p).is_file() and f"3D page:       {p}" in proc.stdout for p in result["pages"])
    meshes = sorted(workdir.rglob("generate/**/*.glb"))
    assert len(meshes) == 4
    for path in meshes:
        mesh = trimesh.load(path, force="mesh")
        assert len(mesh.faces) > 0

    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(result["mlflow_uri"])
    client = MlflowClient()
    champion = client.get_model_version_by_alias("mar3d", "champion")
    for comp in ("vae", "cond", "lr", "hr"):  # cond: the one image encoder of the release
        assert champion.tags[f"component.{comp}"].startswith(f"mar3d-{comp}/")
    # The gate's group (held-out objects) next to its mean-shape baseline, both groups logged.
    assert {"metric.heldout_objects/f_score", "metric.heldout_objects/baseline/f_score",
            "metric.seen_view/f_score", "metric.seen_view/retrieval_top1"} <= set(champion.tags)
    train_runs = client.search_runs([client.get_experiment_by_name("mar3d").experiment_id])
    assert {r.data.tags.get("mar3d.stage") for r in train_runs} == {"vae", "lr", "hr"}
    eval_exp = client.get_experiment_by_name("mar3d-eval")
    assert eval_exp is not None
    # The release leads back to the evaluation that scored it (lineage).
    assert champion.tags["eval_run_id"] in {r.info.run_id for r in client.search_runs([eval_exp.experiment_id])}

    # No credential in what the run wrote: step logs, report.json, results.parquet, kfp's
    # executor inputs (the steps' arguments), MLflow's store and artifacts, its API.
    ray_token = Path.home() / ".ray" / "auth_token"  # the local Ray's own (token auth by default)
    found = leaks({"MLflow password": env["MLFLOW_TRACKING_PASSWORD"],
                   "S3 secret key": env["AWS_SECRET_ACCESS_KEY"],
                   "Ray token": ray_token.read_text().strip() if ray_token.is_file() else ""},
                  folders=[workdir, tmp_path / "result.json"], mlflow_uri=result["mlflow_uri"])
    assert not found, found
