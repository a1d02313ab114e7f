"""What a training worker reads: the Ray Data training stream and the small fixed
evaluation sets, both sampled by :class:`mar3d.data.dataset.ShapeDataset`.

Training data has one path: the driver builds a Ray Data dataset (:func:`ray_datasets`,
split across the workers by Ray Train) and each worker iterates its shard
(:func:`train_stream`). The evaluation samples are a few rows, read by each worker
directly from the shards (a Ray Data job per evaluation set would cost more than
reading them).
"""
from __future__ import annotations

from typing import Any, Iterator

from mar3d import logs

# Rows per Ray Data pass are repeated up to this many batches per worker: with a handful
# of shapes an epoch is one step, and restarting the streaming executor every step would
# cost more than the step itself.
MIN_BATCHES_PER_PASS = 64


def dataset_kwargs(cfg, seed: int | None, split: str | None = None) -> dict[str, Any]:
    """ShapeDataset arguments of a TrainConfig: what the stage reads, how it samples."""
    # The VAE learns occupancy from surfaces; MAR maps an image to the surfaces' latents.
    kwargs: dict[str, Any] = {"num_occ": cfg.num_occ, "rotate": cfg.rotate, "seed": seed,
                              "split": split or cfg.split, "with_occupancy": cfg.stage == "vae",
                              "with_image": cfg.stage != "vae", "cache_rows": cfg.cache_rows}
    if cfg.surface_sizes:
        kwargs["surface_sizes"] = tuple(cfg.surface_sizes)
    return kwargs


def to_device(batch: dict, device) -> dict:
    import torch

    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.items()}


def collate(items: list[dict]) -> dict:
    import torch

    # ``uid`` strings stay out of the batch: nothing in a training step reads them.
    return {k: torch.stack([it[k] for it in items]) for k in items[0] if k != "uid"}


def eval_sources(cfg) -> dict[str, tuple[Any, list[int]]]:
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
    seen = {**dataset_kwargs(cfg, seed, "train"), "near_fraction": 0.0, "rotate": False}
    seen["view_index"] = ShapeDataset(cfg.data, **seen).split_info.evaluation_view()
    heldout = {**dataset_kwargs(cfg, seed, "all" if cfg.eval_data else "val"),
               "near_fraction": 0.0, "rotate": False}
    sources = {}
    for name, root, kwargs in (("eval", cfg.data, seen), ("val", cfg.eval_data or cfg.data, heldout)):
        dataset = ShapeDataset(root, **kwargs)
        if len(dataset):
            sources[name] = (dataset, representative_order(dataset)[: cfg.num_eval_samples])
    return sources


def eval_batches(cfg, rank: int, world: int, device) -> dict[str, list[dict]]:
    """Per evaluation set: this rank's share (every world-th sample) of its fixed samples."""
    return {name: [to_device(collate([dataset[i]]), device) for k, i in enumerate(rows) if k % world == rank]
            for name, (dataset, rows) in eval_sources(cfg).items()}


def ray_datasets(cfg, world_size: int) -> dict[str, Any]:
    """Driver side: ``{"train": dataset}`` for Ray Train to split across the workers.

    With ``feature_cache`` the rows are cached features and posteriors of the same split
    (:func:`mar3d.train.feature_cache.cached_ray_dataset`). Each shape is listed
    ``repeats`` times per pass so that one pass gives every worker
    at least MIN_BATCHES_PER_PASS batches (``seed=None``: every listing draws its own
    random point subsets). With a handful of shapes a pass would otherwise be a single
    step, and restarting Ray Data's streaming executor every step costs more than the step.
    """
    from mar3d.data.dataset import ShapeDataset, ray_dataset
    from mar3d.train.feature_cache import cached_ray_dataset

    kwargs = dataset_kwargs(cfg, None)
    rows = len(ShapeDataset(cfg.data, **kwargs))  # validates the arguments up front
    needed = world_size * cfg.batch_size
    if rows < needed:
        raise ValueError(f"{cfg.data} has {rows} shapes; {world_size} workers x batch_size "
                         f"{cfg.batch_size} need at least {needed}")
    repeats = max(1, -(-MIN_BATCHES_PER_PASS * needed // rows))
    if cfg.feature_cache:
        levels = ("lr", "hr") if cfg.stage == "hr" else (cfg.mar.target_level,)
        train = cached_ray_dataset(cfg.feature_cache, cfg.data, cfg.split, levels, repeats, cfg.cache_rows)
    else:
        train = ray_dataset(cfg.data, repeats=repeats, shuffle=True, with_uid=False, **kwargs)
    train.context.enable_progress_bars = False
    train.context.print_on_execution_start = logs.is_verbose()  # its plan, in its own actor
    return {"train": train}


def train_stream(cfg, device) -> Iterator[dict]:
    """Worker side: endless batches of this worker's shard of the training dataset."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    while True:
        count = 0
        for batch in shard.iter_torch_batches(batch_size=cfg.batch_size, drop_last=True, device=device):
            count += 1
            yield batch
        if count == 0:
            raise RuntimeError("this worker's data shard yielded no full batch")
