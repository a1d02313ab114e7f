"""The per-worker training loop run by Ray Train's TorchTrainer, with DeepSpeed.

``train_loop_per_worker(config)`` is a plain function: every Ray Train worker runs it
with the same ``config`` (the TrainConfig as plain data plus run context from the
driver). Ray Train has already set up ``torch.distributed`` (gloo on CPU, nccl on GPU);
DeepSpeed reuses that process group.

One step = one optimizer step on ``batch_size`` samples per worker. The global step is
the unit of everything (schedule, logging, checkpoints) and is part of each checkpoint,
so a resumed run continues counting where its checkpoint left off.

Checkpoints: DeepSpeed's ``save_checkpoint`` is collective -- every rank writes its part
(rank 0 the module weights and client state, every rank its ZeRO optimizer partition)
into its own temporary folder and reports it with ``ray.train.report``; Ray Train merges
the folders into one checkpoint in persistent storage. Rank 0 adds the EMA
(``ema.safetensors``) and, in the final checkpoint, the exported model folder
(``model/``: safetensors + config.yaml) that the driver logs to MLflow. On (re)start,
``ray.train.get_checkpoint()`` is the latest checkpoint; every rank loads it with
DeepSpeed (module, optimizer, LR scheduler) and restores the EMA and the step.
Resuming needs the same ``num_workers`` when ``zero_stage`` > 0 (ZeRO partitions the
optimizer state by rank). The data stream is not rewound: after a resume each worker
draws fresh random batches (the datasets sample random point subsets anyway).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from mar3d import logs
from mar3d.train.data import eval_batches, train_stream
from mar3d.train.distributed import all_reduce_means, all_reduce_means_any_keys, all_reduce_sum
from mar3d.train.stages import autocast_context, make_stage

DEEPSPEED_TAG = "deepspeed"
TRAINER_STATE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
MODEL_DIR = "model"
# Metrics rank 0 could not send while the tracking server was down (see MetricLogger).
TRACKING_BACKLOG = "tracking_backlog.jsonl"


def deepspeed_config(cfg, world_size: int) -> dict[str, Any]:
    """DeepSpeed config for a TrainConfig. bf16 uses DeepSpeed's torch autocast: weights,
    gradients and optimizer state stay fp32 and only matmuls run in bf16, which keeps
    point coordinates (Fourier features of xyz) in full precision."""
    precision = cfg.resolved_precision()
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.batch_size * world_size,
        "gradient_clipping": float(cfg.grad_clip),
        "zero_optimization": {"stage": int(cfg.zero_stage)},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "torch_autocast": {"enabled": precision == "bf16", "dtype": "bfloat16"},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def _evaluate(stage, engine, batches: list[dict], device, precision: str) -> dict[str, float]:
    import torch

    model = engine.module
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    try:
        with torch.no_grad(), autocast_context(device, precision):
            for batch in batches:
                for k, v in stage.evaluate(model, batch).items():
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0.0) + 1
    finally:
        model.train(was_training)
    return all_reduce_means_any_keys(sums, counts, device)


def _save_checkpoint(engine, ema, stage, cfg, step: int, rank: int, final: bool,
                     metrics: dict[str, float], attempt_start: int,
                     export_extra: dict[str, Any] | None = None) -> None:
    import ray.train
    from ray.train import Checkpoint
    from safetensors.torch import save_file

    from mar3d.weights import save_model_dir

    tmp = tempfile.mkdtemp(prefix=f"mar3d-ckpt-r{rank}-")
    try:
        engine.save_checkpoint(tmp, tag=DEEPSPEED_TAG, client_state={"global_step": step})
        if rank == 0:
            state = {"global_step": step, "stage": cfg.stage, "world_size": engine.world_size,
                     "zero_stage": cfg.zero_stage, "attempt_start_step": attempt_start}
            Path(tmp, TRAINER_STATE).write_text(json.dumps(state))
            if ema is not None:
                save_file(ema.tensors(), str(Path(tmp, EMA_FILE)))
            if final:
                module = engine.module
                weights = ema.state_dict_for(module) if ema is not None else module.state_dict()
                weights, exported = stage.export_weights(weights, tmp)
                save_model_dir(Path(tmp, MODEL_DIR), weights, stage.model_config(), stage.kind,
                               extra={"global_step": step, "weights": "ema" if ema else "raw",
                                      "train_stage": cfg.stage,
                                      "vae_model_uri": cfg.vae_model_uri or None,
                                      **(export_extra or {}), **exported})
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _restore(engine, ema, device) -> int:
    """Load the latest Ray Train checkpoint, if any; returns the step to continue from."""
    import ray.train
    from safetensors.torch import load_file

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        if not Path(folder, DEEPSPEED_TAG).is_dir():
            raise RuntimeError(f"checkpoint {checkpoint.path} has no DeepSpeed state '{DEEPSPEED_TAG}/'")
        load_path, client_state = engine.load_checkpoint(folder, tag=DEEPSPEED_TAG)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {checkpoint.path}")
        if ema is not None:
            ema_path = Path(folder, EMA_FILE)
            if not ema_path.is_file():
                raise RuntimeError(f"checkpoint {checkpoint.path} has no {EMA_FILE} but ema_decay is set")
            ema.load_tensors(load_file(str(ema_path), device=str(device)))
    return int(client_state["global_step"])


class _Window:
    """What happened since the last log point: loss sums, samples, tokens, and where the
    time went (waiting for data vs computing; on small CPU machines data loading is
    often the limit), logged as train/data_ms and train/compute_ms."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}
        self.start = time.perf_counter()
        self.samples = self.tokens = 0
        self.data_seconds = self.compute_seconds = 0.0

    def add(self, out: dict, batch_size: int, tokens: int, data_s: float, compute_s: float) -> None:
        for k, v in out.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.detach())
            self.counts[k] = self.counts.get(k, 0.0) + 1
        self.samples += batch_size
        self.tokens += tokens
        self.data_seconds += data_s
        self.compute_seconds += compute_s

    def metrics(self, device) -> dict[str, float]:
        """``train/*`` means over all ranks (collective: every rank calls it)."""
        elapsed = time.perf_counter() - self.start
        metrics = {f"train/{k}": v for k, v in all_reduce_means(self.sums, self.counts, device).items()}
        samples, tokens = all_reduce_sum([self.samples, self.tokens], device)
        steps = max(1.0, self.counts.get("loss", 1.0))  # this rank's steps in the window
        metrics.update({"train/samples_per_s": samples / elapsed, "train/tokens_per_s": tokens / elapsed,
                        "train/data_ms": 1000.0 * self.data_seconds / steps,
                        "train/compute_ms": 1000.0 * self.compute_seconds / steps})
        return metrics


def _prepare_worker_process(cfg):
    """Process settings that must precede DeepSpeed's import and initialize(); returns
    the deepspeed module."""
    if not cfg.use_gpu:
        # DeepSpeed picks its accelerator at import time; without this it probes CUDA.
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    import torch

    if not cfg.use_gpu:
        torch.set_num_threads(cfg.cpu_threads())
        # On CPU DeepSpeed JIT-compiles its shared-memory all-reduce op at initialize().
        # Only its inference all-reduce uses it (training reduces over gloo), and the build
        # took 1-2 min per worker start, rebuilt over and over when two runs (or a run and
        # a Ray cluster) shared the torch extensions cache; say it is not available.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def _build_engine(deepspeed, cfg, stage, device, world: int):
    """(DeepSpeed engine, LR scheduler, EMA or None), with identical initial weights on
    every rank."""
    import torch

    from mar3d.train.optim import EMA, build_optimizer

    torch.manual_seed(cfg.seed)
    model = stage.build_model().to(device)
    optimizer, scheduler = build_optimizer(model, cfg.lr, cfg.betas, cfg.weight_decay,
                                           cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world), dist_init_required=False)
    return engine, scheduler, (EMA(engine.module, cfg.ema_decay) if cfg.ema_decay else None)


def _open_logger(cfg, config: dict, start_step: int, world: int):
    """Rank 0's MLflow logger, with the attempt's start recorded."""
    from mar3d.tracking import MetricLogger

    logger = MetricLogger(config["tracking_uri"], config["run_id"],
                          Path(config["run_dir"]) / TRACKING_BACKLOG, retry_interval_s=cfg.tracking_retry_s)
    logger.log({"train/start_step": start_step, "train/world_size": world}, step=start_step)
    logger.set_tags({"mar3d.last_attempt_start_step": start_step})
    logger.flush()
    return logger


def _train_step(stage, engine, ema, batch: dict, step: int, window: _Window, data_s: float) -> None:
    """One optimizer step; ``data_s``: how long the batch took to arrive."""
    import torch

    tock = time.perf_counter()
    out = stage.loss(engine, batch, step)
    engine.backward(out["loss"])
    engine.step()
    if ema is not None:
        ema.update(engine.module)
    batch_size = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
    window.add(out, batch_size, batch_size * stage.tokens_per_sample(step), data_s,
               time.perf_counter() - tock)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. ``config``: {"train": TrainConfig as dict, "run_id",
    "tracking_uri", "run_dir"} (built by :func:`mar3d.train.api.run_training`)."""
    from mar3d.config import from_dict
    from mar3d.train.config import TrainConfig

    cfg: TrainConfig = from_dict(TrainConfig, config["train"])
    logs.quiet_dependencies()  # a worker is a process of its own
    deepspeed = _prepare_worker_process(cfg)
    import ray.train
    import ray.train.torch
    import torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    precision = cfg.resolved_precision()

    stage = make_stage(cfg)
    stage.run_id = config.get("run_id", "")
    stage.setup(device, config["tracking_uri"])
    engine, scheduler, ema = _build_engine(deepspeed, cfg, stage, device, world)
    start_step = _restore(engine, ema, device)
    # Different random streams per rank and per attempt (dropout, masks, noise).
    torch.manual_seed(cfg.seed + 1 + rank + 7919 * start_step)
    logger = _open_logger(cfg, config, start_step, world) if rank == 0 else None
    if start_step >= cfg.steps:
        return  # already finished (a re-run of a completed run): nothing to train

    stream = train_stream(cfg, device)
    evaluation = eval_batches(cfg, rank, world, device)
    window = _Window()
    engine.train()
    bar = logs.progress_bar(cfg.steps, f"train {cfg.stage}", "step", enabled=rank == 0,
                            initial=start_step)
    for step in range(start_step, cfg.steps):
        tick = time.perf_counter()
        batch = next(stream)
        _train_step(stage, engine, ema, batch, step, window, time.perf_counter() - tick)
        bar.update(1)

        global_step = step + 1
        last = global_step == cfg.steps
        do_log = global_step % cfg.log_every == 0 or last
        do_eval = last or (cfg.eval_every and global_step % cfg.eval_every == 0)
        do_ckpt = global_step % cfg.checkpoint_every == 0 or last
        if not (do_log or do_eval or do_ckpt):
            continue

        metrics: dict[str, float] = {}
        if do_log:
            metrics.update(window.metrics(device))
            metrics["train/lr"] = scheduler.get_last_lr()[0]
            if device.type == "cuda":
                # Rank 0's high-water mark since start-up (ZeRO balances ranks); what a
                # batch size or config costs in GPU memory, e.g. benchmarks/gpu_figures.py.
                metrics["train/gpu_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            if hasattr(stage, "latent_ms"):
                metrics["train/latent_ms"] = stage.latent_ms()
            bar.set_postfix(loss=metrics["train/loss"])
        if do_eval:
            for name, batches in evaluation.items():
                metrics.update({f"{name}/{k}": v for k, v in
                                _evaluate(stage, engine, batches, device, precision).items()})
        metrics["step"] = global_step
        if logger is not None:
            logger.log({k: v for k, v in metrics.items() if k != "step"}, step=global_step)
            logger.flush()
        # Only checkpoints are reported to Ray Train: a report is a barrier across the
        # workers (0.8-0.9 s each on a 2-core machine, i.e. half the tiny step time when
        # it ran every log_every steps), and MLflow already holds every metric.
        if do_ckpt:
            extra = stage.export_extra(engine.module, ema, rank, world, device) if last else None
            _save_checkpoint(engine, ema, stage, cfg, global_step, rank, last, metrics, start_step,
                             extra)
        if do_log:
            window = _Window()
    bar.close()
