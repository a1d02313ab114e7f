"""The session's trained release: one pipeline run on the session's 2-node cluster.

The test session trains its models once, the way a user on a cluster does: `mar3d
pipeline run --ray-address` submits every step as a Ray job through the Jobs API. On the
way, the driver of the train-vae job is SIGKILLed once Ray Train has registered a
checkpoint; the pipeline fails naming the step, and `--resume <run id>` finishes the run
(data skipped, VAE resumed from its checkpoint, MAR-LR building its feature cache,
MAR-HR training from it, evaluation, promotion, generation). While MAR-LR trains, its two
Ray Train workers pinned to the worker node (through the node's custom resource), that
node's raylet is SIGKILLed past a registered checkpoint and a replacement node joins:
Ray Train restarts the worker group there from the checkpoint and the run goes on.

Read by: the fault tests that check the kills and the resume (reliability/
test_cluster_faults.py), the training tests (what the runs logged and saved), the cascade
tests (does a generated shape follow its image; the release lifecycle), the feature-cache
and serving tests. They read the runs through MLflow and the files the steps wrote, as a
user would.

The trainings are the pipeline's smoke preset made long enough to learn something on
four objects: 300 steps per stage, batch 2, every object and view (``split=all``: the
cascade test asks whether shapes follow their images on the objects trained on), 64 px
condition images for the tiny encoders. The pipeline's evaluation still scores its
"held-out" groups, which here hold objects and views the models trained on: its numbers
check the mechanics, not generalization (the main job's evaluation does that).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from _faults import processes_on, registered_step, wait_for

MODEL_NAME = "mar3d-cluster"
STEPS = {"vae": 300, "lr": 300, "hr": 300}
LOG_EVERY = {"vae": 10, "lr": 50, "hr": 50}
# 64 px condition images keep the tiny encoders fast; the steps resize the shards' renders
# (ConditionConfig settings; the feature-cache tests build their encoder with them too).
SMALL_CONDITION = ["image_size=64", "tiny_clip_patch=16", "tiny_dino_patch=16"]
VAE_CHECKPOINT_EVERY = 100  # the kill lands after the first registered one, mid-run
# MAR-LR: checkpoints every 100 steps, logged every 50; the node is lost at a log point past
# a registered checkpoint, before the last step. Its workers live on the worker node only.
LR_CHECKPOINT_EVERY = 100
LR_NODE_SETTINGS = ["worker_resources={mar3d_node_1: 0.5}", "max_failures=3"]
LOST_NODE = "worker-1"


def stage_overrides(stage: str) -> list[str]:
    """The training settings of ``stage`` in the session's run (over the smoke preset's)."""
    n = STEPS[stage]
    common = [f"steps={n}", "warmup_steps=20", "batch_size=2", "split=all", "num_eval_samples=4",
              f"log_every={LOG_EVERY[stage]}"]
    if stage == "vae":
        return common + [f"checkpoint_every={VAE_CHECKPOINT_EVERY}", "eval_every=100"]
    # One evaluation, after the last step: it does not change the weights.
    common += [f"eval_every={n}", *[f"condition.{o}" for o in SMALL_CONDITION]]
    if stage == "lr":
        return common + [f"checkpoint_every={LR_CHECKPOINT_EVERY}", *LR_NODE_SETTINGS]
    return common + [f"checkpoint_every={n}"]


@dataclass
class StageRun:
    """What a training step recorded (its kfp output pointer): the MLflow run, the model
    it logged, its last checkpoint and final metrics."""
    stage: str
    run_id: str
    model_uri: str
    checkpoint_path: str
    metrics: dict
    location: str
    condition_model_uri: str = ""
    feature_cache: str = ""

    @property
    def steps(self) -> int:
        return STEPS[self.stage]


@dataclass
class ClusterPipelineRun:
    workdir: Path
    run_id: str                  # the pipeline run (its folder under workdir/runs)
    killed_after_step: int       # the VAE checkpoint Ray Train had registered at the kill
    node_lost: dict              # MAR-LR's worker node killed: registered, killed_at (steps)
    first_returncode: int
    first_output: str
    second_returncode: int
    second_output: str
    resumed_jobs: list[dict]     # the Ray jobs of the resumed run: step, status
    result: dict                 # the resumed run's --result-json
    stages: dict[str, StageRun] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)  # name -> value given to the run

    @property
    def data(self) -> Path:
        """The shards the pipeline's data step wrote."""
        return self.workdir / "runs" / self.run_id / "data"

    @property
    def release_uri(self) -> str:
        return f"models:/{MODEL_NAME}@champion"


def _command(cluster, dataset: Path, workdir: Path, mlflow_uri: str, env: dict, *extra: str) -> subprocess.Popen:
    args = [f"{stage}_overrides={json.dumps(stage_overrides(stage))}" for stage in STEPS]
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines", "pipeline", "run", "--ray-address", cluster.dashboard_url,
         "--preset", "smoke", "--feature-cache", *[a for arg in args for a in ("--arg", arg)],
         "--dataset", str(dataset), "--workdir", str(workdir), "--mlflow-uri", mlflow_uri,
         "--model-name", MODEL_NAME, *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _stage_runs(workdir: Path) -> dict[str, StageRun]:
    """The training steps' output pointers of the (resumed) run that trained MAR-HR."""
    pointers = sorted(workdir.glob("kfp/*/train-hr/model"), key=lambda p: p.stat().st_mtime)
    if not pointers:
        return {}
    run_dir = pointers[-1].parent.parent
    out = {}
    for stage in STEPS:
        doc = json.loads((run_dir / f"train-{stage}" / "model").read_text())
        out[stage] = StageRun(stage, doc["run_id"], doc["model_uri"], doc["checkpoint"], doc["metrics"],
                              doc["location"], doc.get("condition_model_uri", ""), doc.get("feature_cache", ""))
    return out


class _Ended(Exception):
    """The pipeline run ended while a fault was waiting for its moment."""


def _lose_lr_node(cluster, workdir: Path, mlflow_uri: str, running) -> dict:
    """Once MAR-LR has logged a step past a registered checkpoint, SIGKILL the raylet of
    the node its workers run on, then join a replacement node with the same resource (a
    KubeRay pod is restarted the same way). ``running()`` raises :class:`_Ended` once the
    pipeline has ended."""
    from mlflow import MlflowClient

    from _faults import logged_steps

    folder = wait_for(lambda: running() and next(iter(workdir.glob("runs/*/train/lr/mar3d_run.json")), None),
                      900, "MAR-LR's run folder")
    run_id = json.loads(folder.read_text())["run_id"]
    client = MlflowClient(tracking_uri=mlflow_uri)
    registered = wait_for(lambda: running() and registered_step(folder.parent), 600,
                          "a registered MAR-LR checkpoint")
    wait_for(lambda: running() and max(logged_steps(client, run_id), default=0) > registered, 300,
             "a MAR-LR step past it")
    workers = len(processes_on(cluster, LOST_NODE, "RayTrainWorker"))
    killed_at = max(logged_steps(client, run_id))
    cluster.kill_node(LOST_NODE)
    resource = next(n.resource for n in cluster.nodes if n.name == LOST_NODE)
    cluster.remove_node(LOST_NODE)
    cluster.add_worker(resource=resource)
    return {"run_id": run_id, "registered": registered, "killed_at": killed_at,
            "workers_on_node": workers}


def run_cluster_pipeline(cluster, dataset: Path, workdir: Path, mlflow_uri: str) -> ClusterPipelineRun:
    """The pipeline on ``cluster``, its train-vae driver killed, then resumed (see the
    module's docstring); this process's environment must hold the cluster's token.
    Raises only when the run cannot go on; the tests check the rest."""
    from mar3d.cluster import job_client

    client = job_client(cluster.dashboard_url)
    given = {"S3 secret key": f"s3-secret-{secrets.token_hex(12)}"}  # one a user's shell may hold
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["AWS_SECRET_ACCESS_KEY"] = given["S3 secret key"]
    before = {j.submission_id for j in client.list_jobs()}
    first = _command(cluster, dataset, workdir, mlflow_uri, env)
    try:
        def vae_job():
            return next((j for j in client.list_jobs() if j.submission_id not in before
                         and (j.metadata or {}).get("mar3d.step") == "train vae"
                         and str(j.status.value) == "RUNNING" and j.driver_info), None)
        job = wait_for(vae_job, 600, "the train-vae Ray job")
        storage = wait_for(lambda: next(iter(workdir.glob("runs/*/train/vae")), None), 300, "its run folder")
        registered = wait_for(lambda: registered_step(storage), 600, "a registered VAE checkpoint")
        os.kill(int(job.driver_info.pid), signal.SIGKILL)
        first_out, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    found = re.search(r"--resume (\S+)", first_out)
    assert found, f"the killed run printed no run id to resume:\n{first_out[-4000:]}"
    run_id = found.group(1)

    resumed_from = {j.submission_id for j in client.list_jobs()}
    result_json = workdir.parent / "result.json"
    second = _command(cluster, dataset, workdir, mlflow_uri, env, "--resume", run_id,
                      "--result-json", str(result_json))

    def running() -> bool:
        if second.poll() is not None:
            raise _Ended
        return True

    try:
        try:
            node_lost = _lose_lr_node(cluster, workdir, mlflow_uri, running)
        except _Ended:  # the tests read its output: why it ended before MAR-LR's node was lost
            node_lost = {}
        second_out, _ = second.communicate(timeout=1800)
    finally:
        if second.poll() is None:
            second.kill()
    jobs = [{"step": (j.metadata or {}).get("mar3d.step"), "status": str(j.status.value)}
            for j in client.list_jobs() if j.submission_id not in resumed_from]
    return ClusterPipelineRun(
        workdir=workdir, run_id=run_id, killed_after_step=registered, node_lost=node_lost,
        first_returncode=first.returncode, first_output=first_out,
        second_returncode=second.returncode, second_output=second_out, resumed_jobs=jobs,
        result=json.loads(result_json.read_text()) if result_json.is_file() else {},
        stages=_stage_runs(workdir), secrets=given)
