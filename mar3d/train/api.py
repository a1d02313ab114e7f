"""``run_training(cfg)``: one stage trained with Ray Train + DeepSpeed, tracked in MLflow.

The driver (this process):

1. validates the config and the data, resolves the MLflow tracking URI and checks it
   answers, then creates the MLflow run -- or re-opens the run recorded in
   ``<storage_path>/<run_name>/mar3d_run.json`` when the same run is started again;
2. logs the flattened config as params and starts a ``TorchTrainer`` whose workers run
   :func:`mar3d.train.loop.train_loop_per_worker` (rank 0 logs metrics into the run);
   MAR-LR/HR get the frozen image encoder from ``condition_model_uri``; when it is empty
   the driver builds it from ``condition`` once, logs it as the run's ``conditioner``
   artifact (a re-run keeps the one logged first) and points the workers at it; with
   ``feature_cache: build`` it then builds the feature/latent cache into
   ``<run>/feature_cache`` (a Ray Data job), and any ``feature_cache`` is checked
   against the run's conditioner, VAE, dataset and surface sizes before a worker starts;
3. after ``fit()`` returns, copies the final model folder (safetensors + config.yaml +
   MLmodel) out of the last checkpoint to ``<storage_path>/<run_name>/model``, records the
   run as finished in ``mar3d_run.json`` and logs the model as the run's ``model``
   artifact, so ``runs:/<run_id>/model`` is the model URI.

Tracking outages: if the MLflow server stops answering during training, rank 0 keeps
training and appends metrics to ``<run_dir>/tracking_backlog.jsonl`` (retrying the server
every ``tracking_retry_s``); the backlog is replayed when it answers again. If it is still
down when training ends, the model and checkpoint are on disk and a ``TrackingError``
says where; running the same command again later uploads everything. A server that is
down when training *starts* is a clear error before any worker starts.

Resuming: a second call with the same ``storage_path`` and ``run_name`` continues the
previous run -- Ray Train finds the run's checkpoint state in storage and hands the
latest checkpoint to the workers, and the same MLflow run keeps receiving metrics. A run
that already trained all its steps (``finished`` in ``mar3d_run.json``, its model folder on
this machine) starts no Ray Train at all: the call only uploads what MLflow is missing.
Use a new ``run_name`` to start from scratch.

Object storage: ``storage_path`` may be ``s3://bucket/prefix`` (:mod:`mar3d.storage`).
Ray Train then writes checkpoints there through pyarrow's S3 filesystem, and
``mar3d_run.json`` and ``model/`` go beside them as objects. What must be a local file
-- the tracking backlog, the local copy of the final model -- lives in a per-run cache
folder (:func:`mar3d.storage.local_cache`) of the driver's machine.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mar3d import lineage, logs, storage
from mar3d.config import flatten, to_dict
from mar3d.train.config import TrainConfig
from mar3d.train.loop import MODEL_DIR, TRACKING_BACKLOG
from mar3d.train.stages import TRAINED_CONDITIONER_DIR

log = logging.getLogger(__name__)

RUN_STATE = "mar3d_run.json"
CONDITIONER_DIR = "conditioner"
FEATURE_CACHE_DIR = "feature_cache"
# Ray Train's controller collects the workers' reports (log points, checkpoints) once per
# poll, and a worker's next report waits for it: at Ray's default of 2 s every log point
# could idle the workers up to 2 s. The driver's value reaches the controller and workers.
REPORT_POLL_ENV, REPORT_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"


class TrainingError(RuntimeError):
    """Training did not finish (workers failed beyond max_failures, or no model came out)."""


@dataclass
class TrainResult:
    run_id: str
    model_uri: str                     # runs:/<run_id>/model
    model_dir: Path                    # local copy of the final model folder
    checkpoint_path: str               # latest Ray Train checkpoint
    metrics: dict[str, Any] = field(default_factory=dict)
    tracking_uri: str = ""
    condition_model_uri: str = ""      # lr/hr: the frozen image encoder the model was trained with
    feature_cache: str = ""            # lr/hr: the feature/latent cache it trained from, if any
    seconds: float = 0.0
    run_location: str = ""             # <storage_path>/<run_name>: a folder or an s3:// URI


def _storage_root(cfg: TrainConfig) -> str:
    """The storage root as a URI, or a local path made absolute (workers may run elsewhere)."""
    if storage.is_remote(cfg.storage_path):
        return cfg.storage_path.rstrip("/")
    return str(Path(cfg.storage_path).expanduser().resolve())


def _local_run_dir(root: str, name: str) -> Path:
    """Where the driver keeps the run's local files: the run folder itself for local
    storage, a stable cache folder (same one on every re-run) for object storage."""
    if storage.is_remote(root):
        return storage.local_cache(storage.join(root, name))
    return Path(root) / name


def _worker_env(cfg: TrainConfig) -> dict[str, str]:
    env = {k: os.environ[k] for k in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES")
           if k in os.environ}
    if any(storage.is_remote(p) for p in (cfg.storage_path, cfg.data, cfg.eval_data)):
        env.update(storage.aws_env())
    env.update(logs.worker_env())
    if not cfg.use_gpu:
        # Must be in the environment before DeepSpeed is imported in the worker.
        env["DS_ACCELERATOR"] = "cpu"
        # Fractional-CPU workers would each start one thread per core otherwise.
        env["OMP_NUM_THREADS"] = str(cfg.cpu_threads())
    return env


def _check_stage_inputs(cfg: TrainConfig, tracking_uri: str):
    """Fail in the driver, before any worker starts, when the frozen VAE cannot serve
    the MAR config (wrong token count/channels) or cannot be found; returns the VAE
    (None for the VAE stage)."""
    if cfg.stage == "vae":
        return None
    from mar3d.inference import check_vae_fits_mar, load_frozen_conditioner, load_frozen_vae

    vae, _ = load_frozen_vae(cfg.vae_model_uri, tracking_uri)
    check_vae_fits_mar(vae.cfg, cfg.mar)
    if cfg.condition_model_uri:
        load_frozen_conditioner(cfg.condition_model_uri, cfg.condition, tracking_uri)
    return vae


def _prepare_feature_cache(cfg: TrainConfig, tracking_uri: str, run_location: str, vae) -> None:
    """lr/hr with ``feature_cache``: build it into the run folder first when it says
    ``build`` (a re-run reuses the identical cache built before), then refuse a cache
    that was made from another conditioner, VAE, dataset or surface sizes."""
    from mar3d.train.feature_cache import (BUILD, FeatureCacheConfig, build_feature_cache,
                                           check_cache_fits, conditioner_doc, resolved_surface_sizes,
                                           vae_id)

    if cfg.stage == "vae" or not cfg.feature_cache:
        return
    sizes = resolved_surface_sizes(cfg.data, cfg.surface_sizes)
    if cfg.feature_cache == BUILD:
        built = build_feature_cache(cfg.data, storage.join(run_location, FEATURE_CACHE_DIR),
                                    cfg.condition_model_uri, cfg.vae_model_uri,
                                    FeatureCacheConfig(surface_sizes=sizes, seed=cfg.seed,
                                                       gpus_per_worker=1.0 if cfg.use_gpu else 0.0),
                                    tracking_uri)
        log.info(built.summary())
        cfg.feature_cache = built.output
    check_cache_fits(cfg.feature_cache, data=cfg.data, surface_sizes=sizes, vae_id=vae_id(vae),
                     conditioner_id=str(conditioner_doc(cfg.condition_model_uri, tracking_uri)
                                        ["extra"]["conditioner_id"]))


def _prepare_conditioner(cfg: TrainConfig, tracking_uri: str, run_id: str, run_dir: Path) -> None:
    """lr/hr without ``condition_model_uri``: build the frozen image encoder from
    ``cfg.condition`` here, once, log it as the run's ``conditioner`` artifact and point
    ``cfg.condition_model_uri`` (what the workers load) at it. A re-run of the same run
    reuses the artifact it logged first: its checkpoints were trained on that one."""
    from mar3d import tracking
    from mar3d.inference import save_conditioner
    from mar3d.models.condition import ImageEncoder

    if cfg.stage == "vae" or cfg.condition_model_uri:
        return
    if not list(tracking.list_artifacts(tracking_uri, run_id, CONDITIONER_DIR)):
        folder = run_dir / CONDITIONER_DIR
        if folder.exists():
            shutil.rmtree(folder)
        conditioner_id = save_conditioner(ImageEncoder(cfg.condition), folder)
        tracking.log_artifacts(tracking_uri, run_id, folder, CONDITIONER_DIR)
        log.info("image encoder %s logged as runs:/%s/%s", conditioner_id, run_id, CONDITIONER_DIR)
    cfg.condition_model_uri = f"runs:/{run_id}/{CONDITIONER_DIR}"
    tracking.client(tracking_uri).set_tag(run_id, "mar3d.condition_model_uri", cfg.condition_model_uri)


def run_training(cfg: TrainConfig) -> TrainResult:
    """Train ``cfg.stage``; returns the MLflow run id, model URI and final metrics."""
    from mar3d import tracking
    from mar3d.ray_runtime import ensure_ray

    started = time.monotonic()
    cfg.validate()
    cfg.check_data()
    # Bad locations fail here, before the tracking server, Ray or any worker is touched.
    storage.check_all({"training storage_path": cfg.storage_path, "training data": cfg.data,
                       "eval data": cfg.eval_data}, must_exist=("training data", "eval data"))
    tracking.configure_http_timeouts()
    root = _storage_root(cfg)
    run_location = storage.join(root, cfg.name)
    run_dir = _local_run_dir(root, cfg.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    tracking_uri = cfg.mlflow_uri or tracking.default_tracking_uri(root)
    tracking.check_reachable(tracking_uri)
    vae = _check_stage_inputs(cfg, tracking_uri)
    previous = _previous_run(run_location, tracking_uri)
    with tracking.tracked_run(tracking_uri, cfg.experiment, cfg.name, run_id=previous.get("run_id"),
                              tags={"mar3d.stage": cfg.stage, "mar3d.run_dir": run_location},
                              resumable=True) as run:
        run_id = run.run_id
        finished = _finished_training(previous, cfg, run_dir)
        _record_run(cfg, run_location, tracking_uri, run_id, finished)
        _prepare_conditioner(cfg, tracking_uri, run_id, run_dir)
        _prepare_feature_cache(cfg, tracking_uri, run_location, vae)
        if finished:
            log.info("training %s (%s) already finished at step %d (model in %s): uploading what "
                     "MLflow is missing, without starting Ray Train", cfg.stage, cfg.name,
                     finished["metrics"].get("step", cfg.steps), run_dir / MODEL_DIR)
        else:
            # The workers' progress and logs reach this driver's output (the step log).
            ensure_ray(log_to_driver=True)
            os.environ.setdefault(REPORT_POLL_ENV, REPORT_POLL_S)  # a user's own setting wins
            trainer = _make_trainer(cfg, root, {"run_id": run_id, "tracking_uri": tracking_uri,
                                                "run_dir": str(run_dir)})
            try:
                result = trainer.fit()
            except Exception as e:
                raise TrainingError(f"training {cfg.stage} ({cfg.name}) failed: {e}") from e
            _export_model(result, cfg, run_dir, root, run_location)
            finished = {"checkpoint": str(result.checkpoint.path), "metrics": dict(result.metrics or {})}
            _write_run_state(cfg, run_location, tracking_uri, run_id, finished)
        model_dir = run_dir / MODEL_DIR
        _finish_tracking_run(cfg, run, run_dir, model_dir, finished["checkpoint"])
    return TrainResult(run_id=run_id, model_uri=f"runs:/{run_id}/{MODEL_DIR}", model_dir=model_dir,
                       run_location=run_location,
                       checkpoint_path=finished["checkpoint"], metrics=finished["metrics"],
                       tracking_uri=tracking_uri, seconds=time.monotonic() - started,
                       condition_model_uri=cfg.condition_model_uri, feature_cache=cfg.feature_cache)


def _previous_run(run_location: str, tracking_uri: str) -> dict[str, Any]:
    """What an earlier start of the same training run recorded (the run folder's
    ``mar3d_run.json``: its MLflow run, to be re-opened, and once it trained to the end,
    ``finished``); {} for a new run."""
    state_path = storage.join(run_location, RUN_STATE)
    previous = json.loads(storage.read_bytes(state_path)) if storage.is_file(state_path) else {}
    if previous and previous.get("tracking_uri") != tracking_uri:
        raise ValueError(f"{run_location} belongs to a run tracked at {previous.get('tracking_uri')}, "
                         f"not {tracking_uri}; use the same mlflow_uri or a new run_name")
    return previous


def _finished_training(previous: dict[str, Any], cfg: TrainConfig, run_dir: Path) -> dict[str, Any] | None:
    """The earlier start's final checkpoint and metrics when it trained all ``cfg.steps``
    and its final model is in ``run_dir`` (a re-run after a tracking outage, or of a
    completed pipeline step): nothing is left to train, and Ray Train need not start.
    Otherwise None (more steps asked for, or the model folder is not on this machine)."""
    finished = previous.get("finished") or {}
    step = (finished.get("metrics") or {}).get("step", 0)
    if step >= cfg.steps and (run_dir / MODEL_DIR / "config.yaml").is_file():
        return finished
    return None


def _write_run_state(cfg: TrainConfig, run_location: str, tracking_uri: str, run_id: str,
                     finished: dict[str, Any] | None) -> None:
    """The run folder's ``mar3d_run.json``: a restart re-opens this MLflow run, and knows
    once it has trained to the end (``finished``: final checkpoint and metrics)."""
    state = {"run_id": run_id, "tracking_uri": tracking_uri, "stage": cfg.stage}
    if finished:
        state["finished"] = finished
    storage.write_bytes(storage.join(run_location, RUN_STATE), json.dumps(state, indent=2, default=float).encode())


def _record_run(cfg: TrainConfig, run_location: str, tracking_uri: str, run_id: str,
                finished: dict[str, Any] | None) -> None:
    """Write the run folder's ``mar3d_run.json`` and log the run's params and inputs."""
    from mar3d import tracking

    _write_run_state(cfg, run_location, tracking_uri, run_id, finished)
    log.info("training %s: MLflow run %s at %s, outputs in %s", cfg.stage, run_id, tracking_uri, run_location)
    # How often a dead tracking server is retried is operations, not the experiment.
    params = {k: v for k, v in flatten(cfg).items() if k != "tracking_retry_s"}
    params.update({"world_size": cfg.num_workers, "precision_resolved": cfg.resolved_precision(),
                   "backend_resolved": cfg.resolved_backend()})
    tracking.log_params(tracking_uri, run_id, params)
    from mar3d.evaluate import dataset_fingerprint

    lineage.log_prepared_dataset(tracking_uri, run_id, cfg.data, dataset_fingerprint(cfg.data), "train",
                                 {"split": cfg.split})
    if cfg.eval_data:
        lineage.log_prepared_dataset(tracking_uri, run_id, cfg.eval_data, dataset_fingerprint(cfg.eval_data),
                                     "eval")


def _make_trainer(cfg: TrainConfig, root: str, run_context: dict[str, str]):
    """The TorchTrainer of a run: scaling, storage, failure handling and the training
    dataset, as data (``run_context``: run_id, tracking_uri, run_dir for the workers)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from mar3d.train.data import ray_datasets
    from mar3d.train.loop import train_loop_per_worker

    storage_fs, storage_fs_path = storage.filesystem(root)
    resources = {"CPU": cfg.cpus_per_worker, **cfg.worker_resources}
    if cfg.use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": to_dict(cfg), **run_context},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.name, storage_path=storage_fs_path,
            # Passed explicitly so that Ray uses the endpoint and region of the AWS
            # variables (pyarrow's from_uri alone would ignore a custom endpoint).
            storage_filesystem=storage_fs if storage.is_remote(root) else None,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            worker_runtime_env={"env_vars": _worker_env(cfg)}),
        datasets=ray_datasets(cfg, cfg.num_workers),
        dataset_config=DataConfig(datasets_to_split=["train"]),
        torch_config=TorchConfig(backend=cfg.resolved_backend()),
    )


def _export_model(result, cfg: TrainConfig, run_dir: Path, root: str, run_location: str) -> None:
    """Copy the final model folder out of the last checkpoint to ``run_dir/model`` (and
    beside the checkpoints on object storage)."""
    if result.checkpoint is None:
        raise TrainingError(f"training {cfg.name} finished without a checkpoint")
    model_dir = run_dir / MODEL_DIR
    with result.checkpoint.as_directory() as folder:
        exported = Path(folder, MODEL_DIR)
        if not exported.is_dir():
            raise TrainingError(f"the last checkpoint {result.checkpoint.path} holds no final "
                                f"'{MODEL_DIR}/' folder (training stopped before step {cfg.steps}?)")
        if model_dir.exists():
            shutil.rmtree(model_dir)
        shutil.copytree(exported, model_dir)
        # MAR-LR that trained its image encoder (condition.train_encoders) exported the
        # towers beside its model: they are the run's conditioner from now on.
        trained = Path(folder, TRAINED_CONDITIONER_DIR)
        if trained.is_dir():
            target = run_dir / TRAINED_CONDITIONER_DIR
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(trained, target)
    if storage.is_remote(root):
        storage.upload_dir(model_dir, storage.join(run_location, MODEL_DIR))


def _finish_tracking_run(cfg: TrainConfig, run, run_dir: Path, model_dir: Path, checkpoint: str) -> None:
    """Replay metrics that waited out a tracking outage, log the model, mark the run
    FINISHED; if the server is down now, say where everything is instead (the run stays
    RUNNING for the re-run that uploads them)."""
    from mar3d import tracking
    tracking_uri, run_id = run.tracking_uri, run.run_id
    backlog = run_dir / TRACKING_BACKLOG
    try:
        c = tracking.client(tracking_uri)
        replayed = tracking.replay_backlog(c, run_id, backlog)
        if replayed:
            log.warning("uploaded %d metric/tag records that waited in %s during a tracking outage",
                        replayed, backlog)
        tracking.log_artifacts(tracking_uri, run_id, model_dir, MODEL_DIR)
        c.set_tag(run_id, "mar3d.model_uri", f"runs:/{run_id}/{MODEL_DIR}")
        if not lineage.produced_model_id(c, run_id):  # once, also when a re-run finishes the run
            lineage.log_produced_model(tracking_uri, run_id, cfg.name, f"runs:/{run_id}/{MODEL_DIR}",
                                       cfg.stage, {"steps": cfg.steps, "data": cfg.data})
        trained = run_dir / TRAINED_CONDITIONER_DIR
        if trained.is_dir():
            tracking.log_artifacts(tracking_uri, run_id, trained, TRAINED_CONDITIONER_DIR)
            cfg.condition_model_uri = f"runs:/{run_id}/{TRAINED_CONDITIONER_DIR}"
            c.set_tag(run_id, "mar3d.condition_model_uri", cfg.condition_model_uri)
        run.finish()
    except Exception as e:
        if not tracking.is_outage(e):
            raise
        raise tracking.TrackingError(
            f"training {cfg.name} finished and nothing is lost, but MLflow at {tracking_uri} is "
            f"unreachable ({str(e).splitlines()[0][:200]}). The final model is in {model_dir}, the last "
            f"checkpoint in {checkpoint}, and {tracking.backlog_size(backlog)} metric/tag "
            f"records wait in {backlog}. Run the same command again once the server answers: it "
            "re-opens the finished run without training, uploads them and the model, and marks "
            "the run FINISHED.") from e
