"""Multi-node faults on a real 2-node Ray cluster (`mar3d cluster up --local`), every job
submitted through the Jobs API as the pipeline submits it:

* the worker node's raylet SIGKILLed while a data-prepare job has tasks there -> the job
  completes, every input is a row, the same uids as an uninterrupted run;
* the worker node's raylet SIGKILLed while the pipeline's MAR-LR workers (pinned there
  through the node's custom resource) train -> a replacement node joins, Ray Train
  restarts the worker group from the last checkpoint, the run finishes with every metric
  in MLflow and the pipeline goes on;
* the driver of a pipeline step's Ray job SIGKILLed -> the pipeline fails naming the step
  and the reason; `pipeline run --resume <run id>` finishes the run: the data step skips
  its complete shards, training resumes from its checkpoint, every step ran as a Ray job
  and succeeded, the release is promoted and the meshes are written.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from mlflow import MlflowClient

from _faults import Background, logged_steps, one_row_shards, processes_on, uids, wait_for
from _leaks import leaks
from _pipeline_run import LOG_EVERY, LR_CHECKPOINT_EVERY, MODEL_NAME, STEPS
from components._run import run_step
from mar3d.cluster import job_client

pytestmark = pytest.mark.e2e


@pytest.fixture
def cluster(cluster_env):
    """The session's 2-node cluster; after the test it has a live worker node again."""
    yield cluster_env
    workers = [n for n in cluster_env.nodes if n.name != "head"]
    for node in workers:
        try:
            cluster_env.raylet_pid(node.name)
        except Exception:  # noqa: BLE001 - its raylet was killed and never replaced
            cluster_env.remove_node(node.name)
            cluster_env.add_worker(resource=node.resource)


def _config_file(tmp_path: Path, cfg) -> Path:
    from mar3d.config import to_dict

    path = tmp_path / "data.yaml"
    path.write_text(json.dumps(to_dict(cfg)))  # JSON is YAML
    return path


# ----------------------------------------------------------- (a) data job, node lost
def test_worker_node_lost_during_data_prepare(cluster, ycb_small_dir, tmp_path, reliability_report):
    config = _config_file(tmp_path, one_row_shards())
    clean, out = tmp_path / "clean", tmp_path / "data"
    argv = ["mar3d", "data", "prepare", "--input", str(ycb_small_dir), "--config", str(config),
            "--no-progress", "--output"]
    reference = run_step(argv + [str(clean)], cluster.dashboard_url, poll_seconds=0.5)

    job = Background(lambda: run_step(argv + [str(out)], cluster.dashboard_url, poll_seconds=0.5))
    wait_for(lambda: processes_on(cluster, "worker-1", "_process_item"), 180,
             "a _process_item task on the worker node", interval=0.05)
    raylet = cluster.kill_node("worker-1")
    result = job.join(600)
    assert job.error is None, job.error
    assert result["num_rows"] == reference["num_rows"] == 4 and result["num_errors"] == 0
    assert uids(out) == uids(clean)  # every input exactly once
    reliability_report.add("faults", fault="SIGKILL the worker node's raylet during a data-prepare "
                           "Ray job", at=f"task running there (raylet pid {raylet})",
                           outcome="tasks rescheduled on the head, job SUCCEEDED",
                           lost=f"0 (rows {result['num_rows']}/4, same uids)")


# ------------------------------------------------------- (b) training, node lost
def test_worker_node_lost_during_training_resumes_from_checkpoint(cluster_pipeline, mlflow_server,
                                                                  reliability_report):
    """The session's pipeline run lost the worker node its MAR-LR workers were pinned to
    (tests/_pipeline_run.py): the step still succeeded, from the last checkpoint."""
    lost = cluster_pipeline.node_lost
    assert lost, cluster_pipeline.second_output[-6000:]
    assert lost["workers_on_node"] == 2, "the MAR-LR workers were not on the pinned node"
    steps, log_every = STEPS["lr"], LOG_EVERY["lr"]
    assert lost["killed_at"] < steps, f"the node was killed after the last step ({lost['killed_at']})"
    lr = cluster_pipeline.stages["lr"]
    assert lr.run_id == lost["run_id"] and lr.metrics["step"] == steps
    client = MlflowClient(tracking_uri=mlflow_server)
    starts = sorted((m.step, m.value) for m in client.get_metric_history(lr.run_id, "train/start_step"))
    assert starts[0] == (0, 0.0) and len(starts) >= 2, starts
    resumed = int(starts[-1][1])
    # killed_at is the last step MLflow showed; training may have reached the next log point.
    assert resumed % LR_CHECKPOINT_EVERY == 0 and lost["registered"] <= resumed <= lost["killed_at"] + log_every, \
        (starts, lost)
    log_points = list(range(log_every, steps + 1, log_every))
    assert logged_steps(client, lr.run_id) == log_points
    assert client.get_run(lr.run_id).info.status == "FINISHED"
    reliability_report.add("faults", fault="SIGKILL the worker node's raylet while both Ray Train "
                           "workers (the pipeline's MAR-LR) run there", at=f"step ~{lost['killed_at']}",
                           outcome=f"replacement node joined; worker group restarted at checkpoint "
                           f"step {resumed}, finished step {steps}; the pipeline went on",
                           lost=f"0 steps (all {len(log_points)} log points in MLflow)")


# ------------------------------------- (c) pipeline step's driver killed, then resume
def test_pipeline_on_cluster_step_driver_killed_then_resumed(cluster, cluster_pipeline, mlflow_server,
                                                             reliability_report):
    """The session's pipeline run (tests/_pipeline_run.py): every step a Ray job on the
    cluster, the train-vae driver SIGKILLed after a registered checkpoint, then --resume."""
    run = cluster_pipeline
    registered = run.killed_after_step
    out = run.first_output
    assert run.first_returncode == 1, out[-4000:]
    tail = out[out.rindex("mar3d: StepFailed"):]
    assert "Inner task failed: 'train-vae'" in tail
    assert "`mar3d train vae` failed: Ray job" in tail and "FAILED" in tail
    assert f"--resume {run.run_id}" in tail
    assert (run.data / "manifest.json").is_file()

    out2 = run.second_output
    assert run.second_returncode == 0, out2[-6000:]
    # Every step ran as a Ray job on the cluster, and each one succeeded.
    assert sorted(j["step"] for j in run.resumed_jobs) == sorted(
        ["data prepare", "train vae", "train lr", "train hr", "evaluate", "promote", "generate"])
    assert {j["status"] for j in run.resumed_jobs} == {"SUCCEEDED"}, run.resumed_jobs
    # Complete shards skipped: the step's line on the console, its full summary in its log.
    assert "data prepare: done in" in out2 and "0 new shard(s), 0 rejected, 4 already done" in out2
    assert "4 inputs: 0 new rows, 0 new errors, 4 already done" in (run.data / "step.log").read_text()

    mlflow = MlflowClient(tracking_uri=mlflow_server)
    vae_run = run.stages["vae"].run_id
    starts = sorted(m.value for m in mlflow.get_metric_history(vae_run, "train/start_step"))
    assert starts[0] == 0 and starts[-1] >= registered > 0, (starts, registered)
    champion = mlflow.get_model_version_by_alias(MODEL_NAME, "champion")
    for comp in ("vae", "lr", "hr"):
        assert champion.tags[f"component.{comp}"].startswith(f"{MODEL_NAME}-{comp}/")
    assert run.result["run_id"] == run.run_id and run.result["num_meshes"] == 4
    assert len(list((run.workdir / "runs" / run.run_id / "generate").rglob("*.glb"))) == 4
    # The run logged in to the authenticated MLflow server and the token-authenticated
    # cluster; no credential is in anything it wrote: step logs, report.json,
    # results.parquet, kfp's executor inputs (the steps' arguments), the MLflow server's
    # stores and artifacts, its runs' params/tags/metric names, the Ray jobs' metadata and logs.
    found = leaks({"MLflow password": os.environ["MLFLOW_TRACKING_PASSWORD"], **run.secrets,
                   "Ray token": Path(cluster.token_path).read_text().strip()},
                  folders=[run.workdir, mlflow_server.root], mlflow_uri=mlflow_server,
                  ray_client=job_client(cluster.dashboard_url))
    assert not found, found
    reliability_report.add("faults", fault="SIGKILL the driver of the pipeline's train-vae Ray job",
                           at=f"after checkpoint step {registered}",
                           outcome=f"pipeline failed naming train-vae; --resume {run.run_id}: data skipped "
                           f"4/4, VAE resumed at step {int(starts[-1])}, 7 Ray jobs SUCCEEDED, promoted",
                           lost="0")
