"""TrainConfig: every knob of a training run, for all three stages (vae, lr, hr).

One dataclass for the three stages keeps the machinery (Ray Train scaling, DeepSpeed,
schedule, checkpoints, MLflow) configured the same way everywhere; the nested model
configs (``vae``, ``mar``, ``condition``) and a few other keys are read only by the stages
that use them, and setting one for another stage is an error (``STAGE_ONLY_KEYS``).

Where things go:

* ``storage_path/run_name/`` -- Ray Train's run folder: checkpoints (``checkpoint_*``,
  the newest ``keep_checkpoints`` kept), ``mar3d_run.json`` (the MLflow run id, so a
  re-run continues the same MLflow run) and ``model/`` (final weights: safetensors +
  config.yaml + MLmodel). ``storage_path`` may be ``s3://bucket/prefix`` (see
  :mod:`mar3d.storage` and :mod:`mar3d.train.api`); so may ``data`` and ``eval_data``.
* MLflow: ``mlflow_uri`` if set, else ``$MLFLOW_TRACKING_URI``, else
  ``sqlite:///<storage_path>/mlflow.db`` (a file store next to the outputs: works on one
  machine with no server; a multi-node cluster must point every node at a server).

Resuming: running the same ``run_name`` with the same ``storage_path`` again continues
from its latest checkpoint (Ray Train restores the run's checkpoint state from
storage), with the global step, optimizer, LR schedule and EMA restored. Within one
invocation, up to ``max_failures`` worker failures are retried from the latest checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

from mar3d.config import ConfigError, load_config, parse_override, read_config
from mar3d.models.condition import ConditionConfig
from mar3d.models.mar import MARConfig
from mar3d.models.vae import VAEConfig

Stage = Literal["vae", "lr", "hr"]
STAGES = ("vae", "lr", "hr")

# Keys only the VAE stage or only the MAR stages (lr, hr) read, and why: set for the other
# kind of stage they would be silently ignored, so editing them would change nothing.
STAGE_ONLY_KEYS = {
    "vae": (("vae", "vae_level", "latent_stats_shapes"),
            "the lr/hr stages encode with the frozen VAE of vae_model_uri and its own saved config"),
    "mar": (("mar", "condition", "vae_model_uri", "condition_model_uri", "latent_target", "latent_norm",
             "feature_cache"),
            "they configure the lr/hr (MAR) stages, not the VAE stage"),
}


@dataclass
class TrainConfig:
    stage: Stage = "vae"

    # --- data and outputs ----------------------------------------------------------------
    data: str = ""                       # shard root written by `mar3d data prepare`
    eval_data: str = ""                  # optional held-out shard root; "" = eval on fixed
                                         # batches drawn once from the training data
    storage_path: str = "outputs/train"  # Ray Train storage (local path or URI)
    run_name: str = ""                   # "" -> the stage name; same name = resume
    experiment: str = "mar3d"            # MLflow experiment
    mlflow_uri: str = ""                 # "" -> $MLFLOW_TRACKING_URI or sqlite next to storage

    # --- Ray Train scaling -----------------------------------------------------------------
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5         # fractional so 2 workers fit on a 2-core laptop
    # CPU training: torch threads per worker (0 = int(cpus_per_worker), at least 1). Ray's
    # CPU count is scheduling, not a thread limit: one worker may reserve 1 CPU (leaving
    # one for the data tasks) and still compute on 2 threads.
    threads_per_worker: int = 0
    gpus_per_worker: float = 1.0         # only used when use_gpu
    # Custom Ray resources each worker also needs, e.g. {"a100": 1} to pick a node type, or
    # {"mar3d_node_1": 0.5} to put the workers on one node of `mar3d cluster up`.
    worker_resources: dict[str, float] = field(default_factory=dict)
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on GPU, gloo on CPU

    # --- DeepSpeed -------------------------------------------------------------------------
    zero_stage: int = 1                  # 0, 1 or 2 (parameters stay whole on every rank)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU

    # --- optimisation --------------------------------------------------------------------
    steps: int = 1000                    # total optimizer steps (global, survives resume)
    batch_size: int = 4                  # per worker
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.01           # matrices only; biases/norms/embeddings: none
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0            # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0               # global norm; 0 disables
    ema_decay: float | None = None       # e.g. 0.999; None disables EMA
    seed: int = 0

    # --- data loading ----------------------------------------------------------------------
    # "train": the dataset's training objects and training views only (mar3d/data/splits.py);
    # "all": every object and view (no held-out evaluation is then honest).
    split: Literal["train", "all"] = "train"
    cache_rows: int = 128                # decoded dataset rows kept per reader process (LRU)
    num_occ: int = 2048                  # occupancy supervision points per sample
    surface_sizes: tuple[int, ...] = ()  # points per pyramid level; () = as stored
    rotate: bool = False                 # random rotation augmentation (view-aligned frame)

    # --- checkpoints, logging, evaluation ------------------------------------------------
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    max_failures: int = 0                # worker failures retried from the latest checkpoint
    log_every: int = 10
    eval_every: int = 0                  # 0: evaluate only at the end
    num_eval_samples: int = 4            # per worker
    # While the MLflow server is unreachable, metrics wait in the run folder and the
    # server is retried at most this often (seconds); training never stops for it.
    tracking_retry_s: float = 30.0

    # --- stage specific --------------------------------------------------------------------
    vae_level: Literal["alternate", "hr", "lr"] = "alternate"  # VAE: which latent set per step
    vae_model_uri: str = ""              # lr/hr: frozen VAE (runs:/.., models:/.., or a folder)
    # lr/hr: the frozen image encoder (a "cond" model folder: runs:/.., models:/.., or a
    # folder). "" builds it from `condition` and logs it to this run as `conditioner`;
    # give MAR-HR the one MAR-LR used (its result's condition_model_uri) so a release
    # stores and runs one encoder.
    condition_model_uri: str = ""
    # VAE: after training, the latent statistics (shift, scale) are measured on this many
    # training shapes and stored with the weights; MAR stages normalize with them.
    latent_stats_shapes: int = 64
    # lr/hr: MAR targets are posterior samples of the frozen VAE ("sample", as the MAR-3D
    # authors) or posterior means ("mean"); latent_norm: train on (z - shift) / scale
    # with the VAE's measured statistics (as MAR scales its latents), else on raw z.
    latent_target: Literal["sample", "mean"] = "sample"
    latent_norm: bool = True
    # lr/hr: train from a feature/latent cache (mar3d/train/feature_cache.py): its folder
    # (`mar3d data cache --output`), or "build" to have the driver build one into the run
    # folder first (the result's feature_cache; MAR-HR can take MAR-LR's). "" = compute
    # encoder features and VAE latents every step. Evaluation always computes them.
    feature_cache: str = ""
    vae: VAEConfig = field(default_factory=VAEConfig)
    mar: MARConfig = field(default_factory=MARConfig)
    condition: ConditionConfig = field(default_factory=ConditionConfig)

    @property
    def name(self) -> str:
        return self.run_name or self.stage

    def resolved_precision(self) -> str:
        if self.precision == "auto":
            return "bf16" if self.use_gpu else "fp32"
        return self.precision

    def cpu_threads(self) -> int:
        """Torch threads of one CPU training worker."""
        return self.threads_per_worker or max(1, int(self.cpus_per_worker))

    def resolved_backend(self) -> str:
        if self.backend == "auto":
            return "nccl" if self.use_gpu else "gloo"
        return self.backend

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"TrainConfig.stage must be one of {STAGES}, got {self.stage!r}")
        for name, amount in self.worker_resources.items():
            if name in ("CPU", "GPU", "memory") or not float(amount) > 0:
                raise ValueError(f"TrainConfig.worker_resources: {name}={amount!r} must be a custom "
                                 "resource with an amount > 0 (CPU/GPU have their own settings)")
        if self.run_name and ("/" in self.run_name or self.run_name.startswith(".")):
            raise ValueError(f"TrainConfig.run_name {self.run_name!r} must be a plain folder name")
        if self.num_workers < 1:
            raise ValueError(f"TrainConfig.num_workers must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"TrainConfig.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.threads_per_worker < 0:
            raise ValueError(f"TrainConfig.threads_per_worker must be >= 0, got {self.threads_per_worker}")
        if self.use_gpu and self.gpus_per_worker <= 0:
            raise ValueError(f"TrainConfig.gpus_per_worker must be > 0 with use_gpu, got {self.gpus_per_worker}")
        if self.backend == "nccl" and not self.use_gpu:
            raise ValueError("TrainConfig.backend 'nccl' needs use_gpu: true (CPU training uses gloo)")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"TrainConfig.zero_stage must be 0, 1 or 2, got {self.zero_stage} "
                             "(stage 3 would shard parameters, which EMA, evaluation and the "
                             "final weight export here assume are whole on every rank)")
        if self.precision == "bf16" and not self.use_gpu:
            raise ValueError("TrainConfig.precision 'bf16' is for GPU training; CPU runs use fp32 "
                             "(precision: auto picks the right one)")
        for name in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every",
                     "num_occ", "num_eval_samples", "latent_stats_shapes"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "cache_rows"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.warmup_steps >= self.steps and self.steps > 1:
            raise ValueError(f"TrainConfig.warmup_steps ({self.warmup_steps}) must be < steps ({self.steps})")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"TrainConfig.betas must be in [0, 1), got {self.betas}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise ValueError(f"TrainConfig.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"TrainConfig.ema_decay must be in (0, 1) or null, got {self.ema_decay}")
        if self.max_failures < -1:
            raise ValueError(f"TrainConfig.max_failures must be >= -1 (-1 = unlimited), got {self.max_failures}")
        if any(n < 1 for n in self.surface_sizes):
            raise ValueError(f"TrainConfig.surface_sizes must be positive, got {self.surface_sizes}")
        if not self.tracking_retry_s > 0:
            raise ValueError(f"TrainConfig.tracking_retry_s must be > 0, got {self.tracking_retry_s}")
        if self.stage in ("lr", "hr") and self.condition.train_encoders:
            self._check_trained_encoders()
        if self.feature_cache and self.rotate:
            raise ValueError("TrainConfig.feature_cache holds latents of unrotated shapes: rotate: true "
                             "cannot train from it (set feature_cache='' to rotate)")
        if self.stage in ("lr", "hr") and not self.vae_model_uri:
            raise ValueError(f"stage {self.stage!r} needs vae_model_uri (the trained VAE: "
                             "runs:/RUN_ID/model, models:/NAME@ALIAS or a local model folder)")

    def _check_trained_encoders(self) -> None:
        """condition.train_encoders: the tiny random towers train with MAR-LR only."""
        if not self.condition.tiny:
            raise ValueError("condition.train_encoders: true is for the tiny random encoders (no "
                             "pretrained weights); pretrained CLIP + DINOv2 stay frozen as in the paper")
        if self.feature_cache:
            raise ValueError("condition.train_encoders: true computes features in every step; a "
                             "feature cache holds frozen ones (set feature_cache='')")
        if self.stage == "hr" and not self.condition_model_uri:
            raise ValueError("condition.train_encoders: MAR-HR trains on the towers MAR-LR trained: set "
                             "condition_model_uri to MAR-LR's (its result's condition_model_uri)")

    def check_data(self) -> None:
        """The data root must exist before anything is started (called by run_training)."""
        if not self.data:
            raise ValueError("TrainConfig.data is empty: set it to a shard root (mar3d data prepare --output)")
        if "://" not in self.data and not Path(self.data).is_dir():
            raise FileNotFoundError(f"training data {self.data} does not exist")
        if self.eval_data and "://" not in self.eval_data and not Path(self.eval_data).is_dir():
            raise FileNotFoundError(f"eval data {self.eval_data} does not exist")


def load_train_config(stage: str, path: str | Path | None = None,
                      overrides: Iterable[str] = ()) -> TrainConfig:
    """Defaults <- YAML ``path`` (a file or preset name) <- ``key=value`` overrides, for ``stage``.

    The stage named on the command line is the one trained; a YAML file or override
    written for another stage, or a key this stage does not read, is an error rather than
    silently training the wrong model or ignoring the value."""
    if stage not in STAGES:
        raise ValueError(f"unknown training stage {stage!r}; expected one of {STAGES}")
    overrides = list(overrides)
    if path is not None:
        doc = read_config(TrainConfig, path)
        declared = doc.get("stage")
        if declared not in (None, stage):
            raise ValueError(f"{path} is a config for stage {declared!r}, not {stage!r}")
        _check_stage_keys(stage, doc, str(path))
    for ov in overrides:
        key, value = parse_override(ov)
        if key == "stage" and value != stage:
            raise ValueError(f"override {ov!r} contradicts the stage {stage!r} being trained")
        _check_stage_keys(stage, [key.split(".")[0]], f"override {ov!r}")
    return load_config(TrainConfig, path, [f"stage={stage}", *overrides])


def _check_stage_keys(stage: str, keys: Iterable[str], where: str) -> None:
    unread, reason = STAGE_ONLY_KEYS["mar" if stage == "vae" else "vae"]
    found = sorted(set(keys) & set(unread))
    if found:
        raise ConfigError(f"{where}: stage {stage!r} does not read {found} ({reason}); remove "
                          f"{'them' if len(found) > 1 else 'it'}")
