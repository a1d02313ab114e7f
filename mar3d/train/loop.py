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
from typing import Any, Iterator

from mar3d import logs, storage

DEEPSPEED_TAG = "deepspeed"
TRAINER_STATE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
MODEL_DIR = "model"
# Metrics rank 0 could not send while the tracking server was down (see MetricLogger).
TRACKING_BACKLOG = "tracking_backlog.jsonl"
# Rows per Ray Data pass are repeated up to this many batches per worker: with a handful
# of shapes an epoch is one step, and restarting the streaming executor every step would
# cost more than the step itself.
MIN_BATCHES_PER_PASS = 64


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


def _to_device(batch: dict, device) -> dict:
    import torch

    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.items()}


def _collate(items: list[dict]) -> dict:
    import torch

    # ``uid`` strings stay out of the batch: nothing in a training step reads them.
    return {k: torch.stack([it[k] for it in items]) for k in items[0] if k != "uid"}


def _dataset_kwargs(cfg, seed: int | None, split: str | None = None) -> dict[str, Any]:
    # The VAE learns occupancy from surfaces; MAR maps an image to the surfaces' latents.
    kwargs: dict[str, Any] = {"num_occ": cfg.num_occ, "rotate": cfg.rotate, "seed": seed,
                              "split": split or cfg.split, "with_occupancy": cfg.stage == "vae",
                              "with_image": cfg.stage != "vae", "cache_rows": cfg.cache_rows}
    if cfg.surface_sizes:
        kwargs["surface_sizes"] = tuple(cfg.surface_sizes)
    return kwargs


def _eval_sources(cfg) -> dict[str, tuple[Any, list[int]]]:
    """Evaluation during training, on fixed samples (same points and views every time):

    * ``"eval"``: training objects seen from their held-out view (VAE: reconstruction of
      training shapes; MAR: a view it never trained on);
    * ``"val"``: held-out objects (``eval_data`` if given, else the dataset's val split).

    Returns name -> (ShapeDataset, rows) for the sets that exist;
    rows are the first ``num_eval_samples`` in the split's hash order (a fixed unbiased
    sample, not the first objects by name). Occupancy is scored on uniform volume points
    only (near_fraction 0), the usual definition of a VAE's volume IoU."""
    from mar3d.data.dataset import ShapeDataset, representative_order

    seed = cfg.seed + 7919
    seen = {**_dataset_kwargs(cfg, seed, "train"), "near_fraction": 0.0, "rotate": False}
    seen["view_index"] = ShapeDataset(cfg.data, **seen).split_info.evaluation_view()
    heldout = {**_dataset_kwargs(cfg, seed, "all" if cfg.eval_data else "val"),
               "near_fraction": 0.0, "rotate": False}
    sources = {}
    for name, root, kwargs in (("eval", cfg.data, seen), ("val", cfg.eval_data or cfg.data, heldout)):
        dataset = ShapeDataset(root, **kwargs)
        if len(dataset):
            sources[name] = (dataset, representative_order(dataset)[: cfg.num_eval_samples])
    return sources


_READERS: dict[tuple, Any] = {}


def _sample_row(item: dict, root: str, kwargs: tuple, rows: int) -> dict:
    """Ray Data map: row id -> one ShapeDataset sample (ids wrap around the dataset)."""
    from mar3d.data.dataset import ShapeDataset

    key = (root, kwargs)
    if key not in _READERS:  # one reader (open Parquet files) per Ray worker process
        _READERS[key] = ShapeDataset(root, **dict(kwargs))
    sample = _READERS[key].sample(int(item["id"]) % rows)
    sample.pop("uid")  # strings do not become tensors; nothing in a step reads them
    return sample


def ray_datasets(cfg, world_size: int) -> dict[str, Any]:
    """Driver side: the Ray Data training dataset (split across workers); the small fixed
    evaluation sets are read by each worker itself (:func:`_eval_batches`).

    The training set is ``mar3d.data.dataset.ShapeDataset`` sampling as a Ray Data map,
    with each shape listed ``repeats`` times per pass so that one pass gives every worker
    at least MIN_BATCHES_PER_PASS batches (``seed=None``: every listing draws its own
    random point subsets). With a handful of shapes a pass would otherwise be a single
    step, and restarting Ray Data's streaming executor every step costs more than the
    step. (``ray_dataset(root)`` is the same sampling without the repetition.)
    """
    import ray.data

    from mar3d.data.dataset import ShapeDataset

    kwargs = _dataset_kwargs(cfg, None)
    rows = len(ShapeDataset(cfg.data, **kwargs))  # validates the arguments up front
    needed = world_size * cfg.batch_size
    if rows < needed:
        raise ValueError(f"{cfg.data} has {rows} shapes; {world_size} workers x batch_size "
                         f"{cfg.batch_size} need at least {needed}")
    repeats = max(1, -(-MIN_BATCHES_PER_PASS * needed // rows))
    train = ray.data.range(rows * repeats).random_shuffle().map(
        _sample_row, fn_kwargs={"root": str(cfg.data), "kwargs": tuple(sorted(kwargs.items())),
                                "rows": rows}, **storage.ray_task_options(cfg.data))
    train.context.enable_progress_bars = False
    train.context.print_on_execution_start = logs.is_verbose()  # its plan, in its own actor
    return {"train": train}


def _ray_train_stream(cfg, device) -> Iterator[dict]:
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    while True:
        count = 0
        for batch in shard.iter_torch_batches(batch_size=cfg.batch_size, drop_last=True, device=device):
            count += 1
            yield batch
        if count == 0:
            raise RuntimeError("this worker's data shard yielded no full batch")


def _torch_train_stream(cfg, rank: int, world: int, device, start_step: int) -> Iterator[dict]:
    from torch.utils.data import DataLoader, DistributedSampler

    from mar3d.data.dataset import ShapeDataset

    dataset = ShapeDataset(cfg.data, **_dataset_kwargs(cfg, cfg.seed + 1000 * rank))
    if len(dataset) < world * cfg.batch_size:
        raise ValueError(f"{cfg.data} has {len(dataset)} shapes; {world} workers x batch_size "
                         f"{cfg.batch_size} need at least {world * cfg.batch_size}")
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                        collate_fn=_collate, num_workers=0)
    # The epoch seeds the shuffle (must be equal on all ranks so their partitions stay
    # disjoint) and the point subsets; starting it at the resumed step keeps a resumed
    # attempt from replaying the first attempt's batches.
    epoch = start_step
    while True:
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        count = 0
        for batch in loader:
            count += 1
            yield _to_device(batch, device)
        if count == 0:
            raise RuntimeError("this worker's DistributedSampler yielded no full batch")
        epoch += 1


def _eval_batches(cfg, rank: int, world: int, device) -> dict[str, list[dict]]:
    """Per evaluation set: this rank's share (every world-th sample) of its fixed samples,
    read directly from the shards (a few rows: a Ray Data job per set would cost more
    than reading them)."""
    return {name: [_to_device(_collate([dataset[i]]), device) for k, i in enumerate(rows) if k % world == rank]
            for name, (dataset, rows) in _eval_sources(cfg).items()}


def _all_reduce_sum(values: list[float], device) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _all_reduce_means(sums: dict[str, float], counts: dict[str, float], device) -> dict[str, float]:
    """Means over all ranks of per-key sums/counts (keys must be the same on every rank)."""
    keys = sorted(sums)
    if not keys:
        return {}
    t = _all_reduce_sum([sums[k] for k in keys] + [counts[k] for k in keys], device)
    n = len(keys)
    return {k: t[i] / t[n + i] for i, k in enumerate(keys) if t[n + i] > 0}


def _evaluate(stage, engine, batches: list[dict], device, precision: str) -> dict[str, float]:
    import torch

    from mar3d.train.stages import autocast_context

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
    return _all_reduce_means_all_keys(sums, counts, device)


def _all_reduce_means_all_keys(sums, counts, device) -> dict[str, float]:
    """Like _all_reduce_means, but a rank without eval samples (more workers than eval
    samples) contributes zeros: first agree on the key set, then reduce."""
    import torch.distributed as dist

    keys = set(sums)
    if dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, sorted(keys))
        keys = set().union(*map(set, gathered))
    for k in keys:
        sums.setdefault(k, 0.0)
        counts.setdefault(k, 0.0)
    return _all_reduce_means(sums, counts, device)


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
                save_model_dir(Path(tmp, MODEL_DIR), weights, stage.model_config(), stage.kind,
                               extra={"global_step": step, "weights": "ema" if ema else "raw",
                                      "train_stage": cfg.stage,
                                      "vae_model_uri": cfg.vae_model_uri or None,
                                      **(export_extra or {})})
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


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. ``config``: {"train": TrainConfig as dict, "run_id",
    "tracking_uri", "run_dir"} (built by :func:`mar3d.train.api.run_training`)."""
    from mar3d.config import from_dict
    from mar3d.train.config import TrainConfig

    cfg: TrainConfig = from_dict(TrainConfig, config["train"])
    logs.quiet_dependencies()  # a worker is a process of its own
    if not cfg.use_gpu:
        # DeepSpeed picks its accelerator at import time; without this it probes CUDA.
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    import ray.train
    import ray.train.torch
    import torch

    from mar3d.tracking import MetricLogger
    from mar3d.train.optim import EMA, build_optimizer
    from mar3d.train.stages import make_stage

    if not cfg.use_gpu:
        torch.set_num_threads(cfg.cpu_threads())
        # On CPU DeepSpeed JIT-compiles its shared-memory all-reduce op at initialize().
        # Only its inference all-reduce uses it (training reduces over gloo), and the build
        # took 1-2 min per worker start, rebuilt over and over when two runs (or a run and
        # a Ray cluster) shared the torch extensions cache; say it is not available.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    precision = cfg.resolved_precision()

    stage = make_stage(cfg)
    stage.setup(device, config["tracking_uri"])
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = stage.build_model().to(device)
    optimizer, scheduler = build_optimizer(model, cfg.lr, cfg.betas, cfg.weight_decay,
                                           cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world), dist_init_required=False)
    ema = EMA(engine.module, cfg.ema_decay) if cfg.ema_decay else None

    start_step = _restore(engine, ema, device)
    # Different random streams per rank and per attempt (dropout, masks, noise).
    torch.manual_seed(cfg.seed + 1 + rank + 7919 * start_step)

    logger = (MetricLogger(config["tracking_uri"], config["run_id"], Path(config["run_dir"]) / TRACKING_BACKLOG,
                           retry_interval_s=cfg.tracking_retry_s) if rank == 0 else None)
    if logger is not None:
        logger.log({"train/start_step": start_step, "train/world_size": world}, step=start_step)
        logger.set_tags({"mar3d.last_attempt_start_step": start_step})
        logger.flush()

    if start_step >= cfg.steps:
        return  # already finished (a re-run of a completed run): nothing to train

    stream = (_ray_train_stream(cfg, device) if cfg.data_loader == "ray"
              else _torch_train_stream(cfg, rank, world, device, start_step))
    eval_batches = _eval_batches(cfg, rank, world, device)

    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    window_start, window_samples, window_tokens = time.perf_counter(), 0, 0
    # Where a step's time goes (waiting for data vs computing), logged as train/data_ms
    # and train/compute_ms: on small CPU machines data loading is often the limit.
    data_seconds = compute_seconds = 0.0
    engine.train()
    bar = logs.progress_bar(cfg.steps, f"train {cfg.stage}", "step", enabled=rank == 0,
                            initial=start_step)
    for step in range(start_step, cfg.steps):
        tick = time.perf_counter()
        batch = next(stream)
        tock = time.perf_counter()
        out = stage.loss(engine, batch, step)
        engine.backward(out["loss"])
        engine.step()
        if ema is not None:
            ema.update(engine.module)
        data_seconds += tock - tick
        compute_seconds += time.perf_counter() - tock
        global_step = step + 1
        bar.update(1)
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
            counts[k] = counts.get(k, 0.0) + 1
        batch_size = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
        window_samples += batch_size
        window_tokens += batch_size * stage.tokens_per_sample(step)

        last = global_step == cfg.steps
        do_log = global_step % cfg.log_every == 0 or last
        do_eval = last or (cfg.eval_every and global_step % cfg.eval_every == 0)
        do_ckpt = global_step % cfg.checkpoint_every == 0 or last
        if not (do_log or do_eval or do_ckpt):
            continue

        metrics: dict[str, float] = {}
        if do_log:
            elapsed = time.perf_counter() - window_start
            metrics.update({f"train/{k}": v for k, v in _all_reduce_means(sums, counts, device).items()})
            samples, tokens = _all_reduce_sum([window_samples, window_tokens], device)
            metrics["train/samples_per_s"] = samples / elapsed
            metrics["train/tokens_per_s"] = tokens / elapsed
            metrics["train/lr"] = scheduler.get_last_lr()[0]
            steps_in_window = max(1.0, counts.get("loss", 1.0))  # this rank's steps since the last log
            metrics["train/data_ms"] = 1000.0 * data_seconds / steps_in_window
            metrics["train/compute_ms"] = 1000.0 * compute_seconds / steps_in_window
            data_seconds = compute_seconds = 0.0
            if hasattr(stage, "latent_ms"):
                metrics["train/latent_ms"] = stage.latent_ms()
            sums, counts = {}, {}
            bar.set_postfix(loss=metrics["train/loss"])
        if do_eval:
            for name, batches in eval_batches.items():
                metrics.update({f"{name}/{k}": v for k, v in
                                _evaluate(stage, engine, batches, device, precision).items()})
        metrics["step"] = global_step
        if logger is not None:
            logger.log({k: v for k, v in metrics.items() if k != "step"}, step=global_step)
            logger.flush()
        if do_ckpt:
            extra = stage.export_extra(engine.module, ema, rank, world, device) if last else None
            _save_checkpoint(engine, ema, stage, cfg, global_step, rank, last, metrics, start_step,
                             extra)
        else:
            ray.train.report(metrics)
        if do_log:
            window_start, window_samples, window_tokens = time.perf_counter(), 0, 0
    bar.close()
