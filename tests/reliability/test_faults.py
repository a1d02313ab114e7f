"""Faults injected from outside, into real processes (a Ray Train worker SIGKILLed
mid-training: in test_object_storage.py, on S3 storage; the worker node lost during
training: test_cluster_faults.py):

* a Ray Data worker SIGKILLed mid-job -> the task is retried, every input still
  becomes exactly one row; the data job's driver SIGKILLed mid-job -> no partial shard
  is listed as complete, and a re-run ends with the same rows as an uninterrupted run;
* the MLflow server stopped during training -> training goes on, metrics wait on disk,
  the job ends with a clear error naming the saved model and checkpoint; after the
  server is back, the same command uploads everything (no metric, no checkpoint lost);
* a promotion interrupted between its alias moves (exception, and SIGKILL of the
  promoting process) -> consumers still resolve the previous champion, and the
  registry is repaired to that consistent state.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from _faults import Background, latest_run_id, logged_steps, one_row_shards, processes, uids, wait_for
from _registry_helpers import make_release
from _services import start_mlflow_server, stop_mlflow_server
from mar3d.config import to_dict
from mar3d.data import prepare_dataset
from mar3d.data.prepare import complete_shards, load_manifest
from mar3d.gate import GateConfig
from mar3d.registry import RegistryConfig, get_release, promote, reconcile_component_aliases
from mar3d.tracking import TrackingError, backlog_size
from mar3d.train import load_train_config, run_training
from mar3d.train.loop import TRACKING_BACKLOG

pytestmark = pytest.mark.e2e


# The fault is triggered on observed progress (MLflow steps), and training cannot run far
# ahead of it: each Ray Train report (log point, checkpoint) waits for the controller's
# next poll. It lands at step ~10-20, well before the last of the 8 log points.
STEPS, CHECKPOINT_EVERY, LOG_EVERY = 40, 10, 5
LOG_POINTS = list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))


def _train_cfg(shards: Path, storage: Path, tracking_uri: str, run_name: str, *extra: str):
    return load_train_config("vae", "train_vae_tiny", [
        f"data={shards}", f"storage_path={storage}", f"mlflow_uri={tracking_uri}",
        f"run_name={run_name}", "experiment=test-reliability", f"steps={STEPS}", "warmup_steps=5",
        f"checkpoint_every={CHECKPOINT_EVERY}", f"log_every={LOG_EVERY}", "eval_every=0", "split=all",
        "batch_size=2", *extra])


# ------------------------------------------------------------------ data job: SIGKILL
@pytest.fixture(scope="module")
def clean_prepare(tmp_path_factory, ycb_small_dir, ray_local):
    """An uninterrupted run: the reference rows."""
    out = tmp_path_factory.mktemp("clean") / "data"
    return prepare_dataset(ycb_small_dir, out, one_row_shards(), progress=False), uids(out)


def test_data_worker_killed_mid_job_is_retried(clean_prepare, ycb_small_dir, tmp_path, reliability_report):
    reference, ref_uids = clean_prepare
    out = tmp_path / "data"
    job = Background(lambda: prepare_dataset(ycb_small_dir, out, one_row_shards(), progress=False))
    victims = wait_for(lambda: processes("_process_item"), 120, "a Ray task running _process_item",
                        interval=0.05)
    victims[0].send_signal(signal.SIGKILL)
    result = job.join(600)
    assert job.error is None, job.error
    assert result.total_errors == 0 and result.total_rows == reference.total_rows == 4
    assert uids(out) == ref_uids  # every input exactly once: nothing lost, nothing doubled
    reliability_report.add("faults", fault="SIGKILL a Ray Data worker running _process_item",
                           at="first task", outcome="task retried by Ray, job finished",
                           lost=f"0 (rows {result.total_rows}/{reference.total_rows})")


def test_data_driver_killed_leaves_no_partial_shard_and_rerun_completes(
        clean_prepare, ycb_small_dir, ray_local, tmp_path, reliability_report):
    reference, ref_uids = clean_prepare
    out = tmp_path / "data"
    config = tmp_path / "data.yaml"
    config.write_text(json.dumps(to_dict(one_row_shards())))  # JSON is YAML
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "mar3d", "data", "prepare", "--input", str(ycb_small_dir),
                             "--output", str(out), "--config", str(config), "--no-progress"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (load_manifest(out) or {}).get("shards"), 300, "the first complete shard",
                  interval=0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    manifest = load_manifest(out)
    listed = manifest["shards"]
    # Every shard the manifest lists is complete and verified; nothing else counts.
    assert complete_shards(out, manifest, verify=True) == listed
    assert 1 <= len(listed) < 4, "the driver was killed too late to interrupt anything"
    leftovers = sorted(p.name for p in (out / "shards").iterdir()
                       if f"shards/{p.name}" not in {s["file"] for s in listed})

    again = prepare_dataset(ycb_small_dir, out, one_row_shards(), progress=False)
    assert again.total_rows == reference.total_rows == 4 and again.total_errors == 0
    assert again.skipped == len(listed) and again.processed == 4 - len(listed)
    assert uids(out) == ref_uids
    assert not [p for p in (out / "shards").iterdir() if p.name.endswith(".tmp")]
    reliability_report.add("faults", fault="SIGKILL the data job's driver (mar3d data prepare)",
                           at=f"after {len(listed)}/4 shards", outcome=f"manifest listed only verified "
                           f"shards; {len(leftovers)} unlisted file(s) removed by the re-run; re-run "
                           f"processed the other {again.processed}", lost=f"0 (rows {again.total_rows}/4)")


# -------------------------------------------------------------- MLflow server stopped
def _polled(job: Background, query):
    """``query`` for wait_for: raises the job's error once it has failed; None while the
    server is too slow to answer (with this test's fail-fast settings, one answer slower
    than 5 s on a loaded machine raises), to be asked again."""
    def poll():
        if not job.running():
            return None
        try:
            return query()
        except MlflowException:
            return None
    return poll


def test_mlflow_outage_during_training_loses_nothing(ycb_small_shards, tmp_path, monkeypatch, caplog,
                                                     reliability_report):
    # Fail fast instead of MLflow's minutes of retries; the logger retries every 2 s.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    server_root = tmp_path / "mlflow"
    server_root.mkdir()
    uri, server = start_mlflow_server(server_root)
    port = int(uri.rsplit(":", 1)[1])
    cfg = _train_cfg(ycb_small_shards, tmp_path / "runs", uri, "vae-outage", "max_failures=0",
                     "tracking_retry_s=2")
    client = MlflowClient(tracking_uri=uri)
    try:
        job = Background(lambda: run_training(cfg))
        run_id = wait_for(_polled(job, lambda: latest_run_id(client, "test-reliability", "vae-outage")),
                          120, "the run")
        last_logged = _polled(job, lambda: max(logged_steps(client, run_id), default=0))
        stopped_after = wait_for(lambda: (step := last_logged() or 0) >= 10 and step, 300, "step 10")
        stop_mlflow_server(server)

        job.join(600)
        assert isinstance(job.error, TrackingError), job.error
        message = str(job.error)
        run_dir = tmp_path / "runs" / "vae-outage"
        backlog = run_dir / TRACKING_BACKLOG
        assert "nothing is lost" in message and str(backlog) in message and "again" in message
        waiting = backlog_size(backlog)
        assert waiting > 0
        waiting_steps = sorted({json.loads(line)["step"] for line in backlog.read_text().splitlines()
                                if json.loads(line)["type"] == "metric"})
        assert STEPS in waiting_steps  # the end of training was not lost with the server
        assert (run_dir / "model" / "model.safetensors").is_file()  # the final model is saved

        server = start_mlflow_server(server_root, port)[1]  # same port, same database
        with caplog.at_level(logging.INFO, logger="mar3d.train.api"):
            again = run_training(cfg)
        # Nothing was left to train: the re-run only uploaded (no Ray Train started).
        assert "already finished at step" in caplog.text and "without starting Ray Train" in caplog.text
        assert again.run_id == run_id and again.metrics["step"] == STEPS
        assert Path(again.checkpoint_path).name.startswith("checkpoint_") and Path(again.checkpoint_path).is_dir()
        assert logged_steps(client, run_id) == LOG_POINTS
        assert client.get_run(run_id).info.status == "FINISHED"
        assert {"model/model.safetensors", "model/config.yaml"} <= \
            {f.path for f in client.list_artifacts(run_id, "model")}
        assert not backlog.exists()
    finally:
        stop_mlflow_server(server)
    reliability_report.add("faults", fault="stop the MLflow server during training",
                           at=f"step ~{stopped_after}", outcome="training finished; clear TrackingError "
                           f"naming model + backlog ({waiting} records); re-run after restart uploaded them",
                           lost=f"0 (metrics at all {len(LOG_POINTS)} log steps, model artifact, checkpoint)")


def test_training_refuses_to_start_without_tracking_server(ycb_small_shards, tmp_path):
    cfg = _train_cfg(ycb_small_shards, tmp_path, "http://127.0.0.1:9", "vae-no-server")
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match="not reachable"):
        run_training(cfg)
    assert time.monotonic() - t0 < 30


# --------------------------------------------------------------- promotion interrupted
KILL_DURING_PROMOTION = textwrap.dedent("""
    import os, signal, sys
    import mlflow
    from mlflow import MlflowClient
    from mar3d.gate import GateConfig
    from mar3d.registry import RegistryConfig, promote

    uri, candidate, name = sys.argv[1:4]
    mlflow.set_tracking_uri(uri)
    move_alias = MlflowClient.set_registered_model_alias

    def die_before_release_alias(self, model, alias, version):
        if model == name and alias == "champion":  # the last move: the release alias
            os.kill(os.getpid(), signal.SIGKILL)
        return move_alias(self, model, alias, version)

    MlflowClient.set_registered_model_alias = die_before_release_alias
    promote(candidate, gate=GateConfig(metrics={"f_score": "max"}, group=""), cfg=RegistryConfig(name=name),
            tracking_uri=uri)
""")


def test_interrupted_promotion_keeps_previous_champion(mlflow_server, tmp_path, monkeypatch,
                                                        reliability_report):
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment("test-reliability-registry")
    name = "mar3d-interrupted"
    cfg = RegistryConfig(name=name)
    gate = GateConfig(metrics={"f_score": "max"}, group="")
    client = MlflowClient()

    def component_aliases():
        return {c: client.get_model_version_by_alias(f"{name}-{c}", "champion").version
                for c in ("vae", "cond", "lr", "hr")}

    # Both releases beat their mean-shape baseline (gate.beat_baseline, the default).
    a = make_release(tmp_path, "a", {"f_score": 0.6, "baseline/f_score": 0.5}, cfg)
    assert promote(a.uri, gate=gate, cfg=cfg).passed
    pinned_a = {c: v for c, (_, v) in a.components.items()}
    assert component_aliases() == pinned_a

    # 1. An exception between the component moves and the release move: rolled back.
    b = make_release(tmp_path, "b", {"f_score": 0.7, "baseline/f_score": 0.5}, cfg)
    move_alias = MlflowClient.set_registered_model_alias

    def fail_on_release_alias(self, model, alias, version):
        if model == name and alias == "champion":
            raise ConnectionError("injected: registry unreachable while moving the release alias")
        return move_alias(self, model, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", fail_on_release_alias)
    with pytest.raises(ConnectionError, match="injected"):
        promote(b.uri, gate=gate, cfg=cfg)
    monkeypatch.undo()
    assert get_release(f"models:/{name}@champion").version == a.version
    assert component_aliases() == pinned_a

    # 2. The promoting process SIGKILLed at the same point: no rollback code can run.
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_PROMOTION, mlflow_server, b.uri, name],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # Consumers resolve the release alias: still the previous champion, fully pinned.
    assert get_release(f"models:/{name}@champion").version == a.version
    assert component_aliases() != pinned_a  # the kill landed after the component moves
    assert sorted(reconcile_component_aliases(name, cfg)) == [f"{name}-{c}" for c in ("cond", "hr", "lr", "vae")]
    assert component_aliases() == pinned_a

    # The next promotion starts from the consistent state and completes.
    assert promote(b.uri, gate=gate, cfg=cfg).passed
    assert get_release(f"models:/{name}@champion").version == b.version
    assert component_aliases() == {c: v for c, (_, v) in b.components.items()}
    reliability_report.add("faults", fault="exception between component and release alias moves",
                           at="promotion", outcome="component aliases rolled back; champion unchanged",
                           lost="0")
    reliability_report.add("faults", fault="SIGKILL the promoting process before the release alias move",
                           at="promotion", outcome="release alias unchanged; component aliases "
                           "re-pointed by reconcile (run by every promote)", lost="0")
