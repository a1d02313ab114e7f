"""Feature/latent cache for MAR training: the frozen parts' outputs, computed once.

MAR-LR/HR training runs two frozen networks on every sample: the image encoder
(CLIP + DINOv2) on one view and the VAE encoder on a point subset of the shape. Both are
pure functions of stored data, so ``build_feature_cache`` (``mar3d data cache``) runs
them once, as a Ray Data job (one actor per worker loads both models once), into
Parquet shards beside the dataset:

* ``clip`` / ``dino``: encoder features of **every stored view** of every object
  (all tokens, :class:`mar3d.models.condition.ImageEncoder`; ``dtype`` float16 by
  default: half the bytes, rounding below what the projection notices, see README);
* ``lr_mean`` / ``lr_logvar`` / ``hr_mean`` / ``hr_logvar``: the frozen VAE's posterior
  (float32) of ``num_subsets`` fixed point subsets per object, drawn as training draws
  them (seed per object and subset, no rotation, the training ``surface_sizes``). The
  posterior, not a sample, is stored: ``latent_target: sample`` still draws a fresh
  ``z = mean + std * eps`` every step, so augmentation by posterior noise is kept and
  only the subset augmentation shrinks to ``num_subsets`` choices.

``manifest.json`` records what the cache was made from (``conditioner_id``, ``vae_id`` =
content id of the VAE weights, the dataset's content fingerprint, surface sizes,
subsets, dtype) and counts; objects that fail are rows of ``errors.parquet``, never
dropped silently. Training (``TrainConfig.feature_cache``) refuses a cache made from
anything else than the run's conditioner, VAE, dataset and surface sizes
(:func:`check_cache_fits`), and reads per sample one training view's features and one
random subset's posterior (:func:`cached_ray_dataset`).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from mar3d import storage
from mar3d.config import to_dict
from mar3d.data.dataset import SAMPLE_BATCH, stack_samples

FORMAT = "mar3d-feature-cache/v1"
MANIFEST = "manifest.json"
ERRORS = "errors.parquet"
SHARDS = "shards"
# TrainConfig.feature_cache value that makes the training driver build the cache itself.
BUILD = "build"
FEATURE_KEYS = ("clip", "dino")
LEVELS = ("lr", "hr")
# ShapeDataset arguments of a reader that needs no occupancy samples (any stored count fits).
NO_OCCUPANCY = {"with_occupancy": False, "num_occ": 1}

_READERS: dict[tuple, "FeatureCacheReader"] = {}


@dataclass
class FeatureCacheConfig:
    num_subsets: int = 4                 # fixed point subsets encoded per object
    dtype: Literal["float16", "float32"] = "float16"  # of the encoder features
    surface_sizes: tuple[int, ...] = ()  # points per pyramid level; () = as stored
    seed: int = 0                        # of the point subsets
    num_workers: int = 1                 # encoder actors (each loads both models once)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0         # > 0: the actors encode on a GPU
    shard_size: int = 64                 # objects per Parquet shard

    def validate(self) -> None:
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"FeatureCacheConfig.dtype must be float16 or float32, got {self.dtype!r}")
        for name in ("num_subsets", "num_workers", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"FeatureCacheConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise ValueError("FeatureCacheConfig.cpus_per_worker must be > 0 and gpus_per_worker >= 0")
        if any(n < 1 for n in self.surface_sizes):
            raise ValueError(f"FeatureCacheConfig.surface_sizes must be positive, got {self.surface_sizes}")


@dataclass
class FeatureCacheResult:
    output: str
    rows: int
    errors: int
    reused: bool                         # an identical cache was already complete there
    manifest: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def objects_per_second(self) -> float:
        return (self.rows + self.errors) / self.seconds if self.seconds > 0 and not self.reused else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"output": self.output, "rows": self.rows, "errors": self.errors, "reused": self.reused,
                "conditioner_id": self.manifest.get("conditioner_id"),
                "vae_id": self.manifest.get("vae_id"), "seconds": round(self.seconds, 3),
                "objects_per_second": round(self.objects_per_second, 3)}

    def summary(self) -> str:
        if self.reused:
            return f"feature cache {self.output} was already complete ({self.rows} objects): reused"
        return (f"feature cache {self.output}: {self.rows} objects encoded, {self.errors} errors "
                f"(see {ERRORS}) in {self.seconds:.1f} s")


# ----------------------------------------------------------------------------- identity
def conditioner_doc(uri: str, tracking_uri: str | None) -> dict:
    """config.yaml of a ``cond`` model folder, without its weights (of a ``runs:/`` URI
    only that file is fetched): its ``conditioner_id`` and encoder shapes (whoever loads
    the weights verifies them against that id)."""
    from mar3d.registry import read_model_config

    doc = read_model_config(uri, tracking_uri)
    if doc.get("kind") != "cond":
        raise ValueError(f"{uri} holds a {doc.get('kind')!r} model, not the image encoder ('cond')")
    return doc


def vae_id(vae) -> str:
    from mar3d.weights import content_id

    return content_id(vae.state_dict())


def resolved_surface_sizes(data: str | Path, sizes: tuple[int, ...]) -> tuple[int, ...]:
    """The surface sizes training reads: the configured ones, or the dataset's stored ones."""
    from mar3d.data.prepare import load_manifest

    if sizes:
        return tuple(int(n) for n in sizes)
    manifest = load_manifest(data)
    if manifest is None:
        raise FileNotFoundError(f"{data} has no manifest.json: run `mar3d data prepare` first")
    return tuple(int(n) for n in manifest["config"]["surface_sizes"])


def load_cache_manifest(root: str | Path) -> dict | None:
    path = storage.join(root, MANIFEST)
    if not storage.is_file(path):
        return None
    manifest = json.loads(storage.read_bytes(path))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{root} is not a feature cache ({FORMAT}); format={manifest.get('format')!r}")
    return manifest


def _identity(manifest: dict) -> dict:
    return {k: manifest[k] for k in ("conditioner_id", "vae_id", "dataset_hash", "surface_sizes",
                                     "num_subsets", "dtype", "seed")}


def check_cache_fits(root: str | Path, *, conditioner_id: str, vae_id: str, data: str | Path,
                     surface_sizes: tuple[int, ...]) -> dict:
    """The cache's manifest, if the cache was made for this training run: same image
    encoder, same VAE weights, same dataset content and surface sizes; else a ValueError
    that says what differs."""
    from mar3d.evaluate import dataset_fingerprint

    manifest = load_cache_manifest(root)
    if manifest is None:
        raise FileNotFoundError(f"feature cache {root} has no {MANIFEST}: build it with `mar3d data cache`")
    problems = []
    if manifest["conditioner_id"] != conditioner_id:
        problems.append(f"it holds features of conditioner {manifest['conditioner_id']}, this run "
                        f"uses conditioner {conditioner_id}")
    if manifest["vae_id"] != vae_id:
        problems.append(f"it holds latents of VAE {manifest['vae_id']}, this run's frozen VAE is {vae_id}")
    data_hash = dataset_fingerprint(data)["hash"]
    if manifest["dataset_hash"] != data_hash:
        problems.append(f"it was made from dataset content {manifest['dataset_hash'][:16]}, "
                        f"{data} is {data_hash[:16]}")
    if tuple(manifest["surface_sizes"]) != tuple(surface_sizes):
        problems.append(f"its latents encode surface_sizes {tuple(manifest['surface_sizes'])}, this "
                        f"run trains on {tuple(surface_sizes)}")
    if problems:
        raise ValueError(f"feature cache {root} does not fit this training run: " + "; ".join(problems)
                         + ". Build one for it (`mar3d data cache`, or feature_cache=build), or "
                         "train without the cache (feature_cache='')")
    return manifest


# ----------------------------------------------------------------------------- encoding
def subset_surfaces(dataset, index: int, num_subsets: int) -> list:
    """The fixed point subsets of row ``index``: ``dataset.sample`` (the training draw)
    at epochs 0..num_subsets-1, stacked per level -> [S, n_k, 6] tensors."""
    import torch

    samples = []
    for subset in range(num_subsets):
        dataset.set_epoch(subset)
        samples.append(dataset.sample(index))
    levels = len(dataset.surface_sizes)
    return [torch.from_numpy(np.stack([s[f"surface_{k}"] for s in samples])) for k in range(levels)]


def encode_object(dataset, index: int, encoder, vae, num_subsets: int, dtype: str) -> dict:
    """One cache row: features of every stored view, posteriors of every subset."""
    import torch

    row = dataset.read_row(index)
    device = next(vae.parameters()).device
    with torch.no_grad():
        features = encoder(row["images"])
        surfaces = [s.to(device) for s in subset_surfaces(dataset, index, num_subsets)]
        out = {"uid": row["uid"]}
        out.update({k: features[k].float().cpu().numpy().astype(dtype) for k in FEATURE_KEYS})
        for level in LEVELS:
            posterior = vae.encode_posterior(surfaces[: vae.required_levels()], level)
            out[f"{level}_mean"] = posterior.mean.float().cpu().numpy()
            out[f"{level}_logvar"] = posterior.logvar.float().cpu().numpy()
    return out


def cache_schema(shapes: dict[str, list[int]], dtype: str) -> pa.Schema:
    from mar3d.data.schema import tensor_type

    fields = [pa.field("uid", pa.string(), nullable=False)]
    for name, shape in shapes.items():
        value = pa.from_numpy_dtype(np.dtype(dtype)) if name in FEATURE_KEYS else pa.float32()
        fields.append(pa.field(name, tensor_type(value, tuple(shape)), nullable=False))
    return pa.schema(fields)


def cache_shapes(spec, vae_cfg, num_views: int, num_subsets: int) -> dict[str, list[int]]:
    tokens = {"lr": vae_cfg.lr_tokens, "hr": vae_cfg.hr_tokens}
    shapes = {"clip": [num_views, 1 + spec.clip_patches, spec.clip_width],
              "dino": [num_views, spec.dino_prefix + spec.dino_patches, spec.dino_width]}
    for level in LEVELS:
        for part in ("mean", "logvar"):
            shapes[f"{level}_{part}"] = [num_subsets, tokens[level], vae_cfg.latent_channels]
    return shapes


class _CacheEncoder:
    """Ray Data actor: loads the frozen encoder and VAE once, encodes one object per row;
    an object that fails becomes an error row (the job goes on)."""

    def __init__(self, data: str, dataset_kwargs: dict, condition_model_uri: str, vae_model_uri: str,
                 tracking_uri: str | None, num_subsets: int, dtype: str, shapes: dict, use_gpu: bool):
        import torch

        from mar3d.data.dataset import ShapeDataset
        from mar3d.inference import load_conditioner, load_frozen_vae
        from mar3d.registry import resolve_model_dir

        device = torch.device("cuda" if use_gpu else "cpu")
        self.dataset = ShapeDataset(data, **dataset_kwargs)
        self.encoder, _ = load_conditioner(resolve_model_dir(condition_model_uri, tracking_uri), device)
        self.vae, _ = load_frozen_vae(vae_model_uri, tracking_uri, device)
        self.num_subsets, self.dtype = num_subsets, dtype
        self.schema = cache_schema(shapes, dtype)

    def __call__(self, item: dict) -> dict:
        from mar3d.data.prepare.process import _serialize_batch
        from mar3d.data.schema import rows_to_batch

        index = int(item["index"])
        try:
            row = encode_object(self.dataset, index, self.encoder, self.vae, self.num_subsets, self.dtype)
            payload = _serialize_batch(rows_to_batch([row], self.schema))
            return {"index": index, "ok": True, "reason": "", "message": "", "payload": payload}
        except Exception as e:  # noqa: BLE001 - every failure is recorded as an error row
            return {"index": index, "ok": False, "reason": "encode_failed",
                    "message": f"{type(e).__name__}: {e}"[:2000], "payload": b""}


# ---------------------------------------------------------------------------------- job
def build_feature_cache(data: str | Path, output: str | Path, condition_model_uri: str,
                        vae_model_uri: str, cfg: FeatureCacheConfig | None = None,
                        tracking_uri: str | None = None, progress: bool = True) -> FeatureCacheResult:
    """Encode every object of the prepared dataset ``data`` into a cache at ``output``
    (see the module docstring). An identical complete cache already there is reused
    (a re-run of a pipeline step); a different one is refused."""
    from mar3d.data.dataset import ShapeDataset
    from mar3d.evaluate import dataset_fingerprint
    from mar3d.inference import load_frozen_vae
    from mar3d.models.condition import EncoderSpec
    from mar3d.ray_runtime import ensure_ray

    cfg = cfg or FeatureCacheConfig()
    cfg.validate()
    storage.check(data, "training data", must_exist=True)
    storage.check(output, "feature cache output")
    start = time.perf_counter()
    sizes = resolved_surface_sizes(data, cfg.surface_sizes)
    vae, _ = load_frozen_vae(vae_model_uri, tracking_uri)
    cond = conditioner_doc(condition_model_uri, tracking_uri)
    identity = {"conditioner_id": str(cond["extra"]["conditioner_id"]),
                "vae_id": vae_id(vae), "dataset_hash": dataset_fingerprint(data)["hash"],
                "surface_sizes": list(sizes), "num_subsets": cfg.num_subsets, "dtype": cfg.dtype,
                "seed": cfg.seed}
    existing = load_cache_manifest(output)
    if existing is not None:
        if _identity(existing) != identity:
            raise ValueError(f"{output} holds a feature cache made from other inputs "
                             f"({_differences(_identity(existing), identity)}); use a new output folder")
        counts = existing["counts"]
        return FeatureCacheResult(str(output), counts["rows"], counts["errors"], True, existing,
                                  time.perf_counter() - start)
    kwargs = {**NO_OCCUPANCY, "surface_sizes": sizes, "rotate": False, "seed": cfg.seed,
              "with_image": True, "split": "all", "cache_rows": 1}
    dataset = ShapeDataset(data, **kwargs)  # validates the sizes against the stored levels
    shapes = cache_shapes(EncoderSpec(**cond["model"]["encoder"]), vae.cfg, dataset.num_views, cfg.num_subsets)
    ensure_ray()
    writer = _CacheWriter(output, cfg.shard_size, cache_schema(shapes, cfg.dtype))
    _encode_all(dataset, writer, cfg, progress, {
        "data": str(data), "dataset_kwargs": kwargs, "condition_model_uri": condition_model_uri,
        "vae_model_uri": vae_model_uri, "tracking_uri": tracking_uri, "num_subsets": cfg.num_subsets,
        "dtype": cfg.dtype, "shapes": shapes, "use_gpu": cfg.gpus_per_worker > 0})
    manifest = writer.finish({"format": FORMAT, **identity, "data": str(data), "shapes": shapes,
                              "num_views": dataset.num_views, "config": to_dict(cfg)})
    return FeatureCacheResult(str(output), writer.rows, len(writer.errors), False, manifest,
                              time.perf_counter() - start)


def _differences(a: dict, b: dict) -> str:
    return "; ".join(f"{k}: {a[k]!r} != {b[k]!r}" for k in a if a[k] != b.get(k))


def _encode_all(dataset, writer: "_CacheWriter", cfg: FeatureCacheConfig, progress: bool,
                actor_kwargs: dict) -> None:
    """Every row of ``dataset`` through the encoder actors, in order, into ``writer``."""
    import ray.data

    from mar3d.data.prepare.process import _deserialize_batch
    from mar3d.logs import progress_bar

    items = [{"index": i} for i in range(len(dataset))]
    bar = progress_bar(len(items), "feature cache", "object", enabled=progress)
    ctx = ray.data.DataContext.get_current()
    old_order, old_bar = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order = True  # shard contents follow the dataset's order
    ctx.enable_progress_bars = False  # our bar counts objects, not blocks
    try:
        if items:
            ds = ray.data.from_items(items, override_num_blocks=len(items)).map(
                _CacheEncoder, fn_constructor_kwargs=actor_kwargs,
                # a fixed pool of that many actors (Ray >= 2.51: `compute`, not `concurrency`)
                compute=ray.data.ActorPoolStrategy(size=min(cfg.num_workers, len(items))),
                num_cpus=cfg.cpus_per_worker,
                num_gpus=cfg.gpus_per_worker or None, **storage.ray_task_options(actor_kwargs["data"], writer.output))
            for result in ds.iter_rows():
                index = int(result["index"])
                if result["ok"]:
                    writer.add_row(_deserialize_batch(result["payload"]))
                else:
                    writer.add_error(dataset.uids[index], str(dataset.index[index][0]),
                                     result["reason"], result["message"])
                bar.update(1)
                bar.set_postfix(done=writer.rows, failed=len(writer.errors))
    finally:
        ctx.execution_options.preserve_order = old_order
        ctx.enable_progress_bars = old_bar
        bar.close()


class _CacheWriter:
    """Shards of ``shard_size`` objects (one row group per object, so training reads
    single objects), errors.parquet, and the manifest last: a cache without a manifest
    is incomplete and is rebuilt from scratch."""

    def __init__(self, output: str | Path, shard_size: int, schema: pa.Schema):
        self.output, self.shard_size, self.schema = output, shard_size, schema
        for stale in storage.list_files(storage.join(output, SHARDS)) if storage.is_dir(
                storage.join(output, SHARDS)) else []:
            storage.delete(stale)  # leftovers of an interrupted build
        storage.makedirs(storage.join(output, SHARDS))
        self.buffer: list[pa.RecordBatch] = []
        self.shards: list[dict] = []
        self.errors: list[dict] = []
        self.rows = 0

    def add_row(self, batch: pa.RecordBatch) -> None:
        self.buffer.append(batch)
        self.rows += 1
        if len(self.buffer) >= self.shard_size:
            self.flush()

    def add_error(self, uid: str, source: str, reason: str, message: str) -> None:
        self.errors.append({"source_path": source, "source_sha256": None, "uid": uid,
                            "reason": reason, "message": message})

    def flush(self) -> None:
        from mar3d.data.prepare import write_shard

        if self.buffer:
            name = f"{SHARDS}/part-{len(self.shards):05d}.parquet"
            self.shards.append(write_shard(self.output, name, self.buffer, self.schema))
            self.buffer = []

    def finish(self, doc: dict) -> dict:
        import io

        import pyarrow.parquet as pq

        from mar3d.data.schema import ERRORS_SCHEMA

        self.flush()
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(self.errors, schema=ERRORS_SCHEMA), sink)
        storage.write_bytes(storage.join(self.output, ERRORS), sink.getvalue())
        reasons: dict[str, int] = {}
        for e in self.errors:
            reasons[e["reason"]] = reasons.get(e["reason"], 0) + 1
        manifest = {**doc, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "counts": {"rows": self.rows, "errors": len(self.errors), "shards": len(self.shards)},
                    "error_reasons": reasons, "errors_file": ERRORS, "shards": self.shards}
        storage.write_bytes(storage.join(self.output, MANIFEST), json.dumps(manifest, indent=2).encode())
        return manifest


def read_cache_errors(root: str | Path) -> list[dict]:
    import pyarrow.parquet as pq

    with storage.open_input(storage.join(root, ERRORS)) as f:
        return pq.read_table(f).to_pylist()


# ----------------------------------------------------------------------------- training
class FeatureCacheReader:
    """The cache rows of one split of ``data``: per sample the features of one random
    view among the split's views and the posterior of one random subset."""

    def __init__(self, root: str | Path, data: str | Path, split: str, levels: tuple[str, ...],
                 cache_rows: int = 128):
        from collections import OrderedDict

        from mar3d.data.dataset import ShapeDataset, _parquet_file

        manifest = load_cache_manifest(root)
        if manifest is None:
            raise FileNotFoundError(f"feature cache {root} has no {MANIFEST}")
        where: dict[str, tuple[str, int]] = {}
        for shard in manifest["shards"]:
            path = storage.join(root, shard["file"])
            uids = _parquet_file(path).read(columns=["uid"]).column("uid").to_pylist()
            where.update({uid: (path, group) for group, uid in enumerate(uids)})
        objects = ShapeDataset(data, split=split, with_image=False, **NO_OCCUPANCY)
        missing = [u for u in objects.uids if u not in where]
        if missing:
            raise ValueError(f"feature cache {root} lacks {len(missing)} of the {len(objects.uids)} "
                             f"{split!r} objects of {data} (e.g. {missing[:3]}; its errors.parquet "
                             "says why): training on the cache would silently drop them")
        self.index = [where[u] for u in objects.uids]
        self.views = list(objects.views)
        self.columns = [*FEATURE_KEYS, *(f"{lv}_{p}" for lv in levels for p in ("mean", "logvar"))]
        self.num_subsets = int(manifest["num_subsets"])
        self.cache_rows = cache_rows
        self._files: dict[str, Any] = {}
        self._cache: OrderedDict[int, dict] = OrderedDict()

    def __len__(self) -> int:
        return len(self.index)

    def read_row(self, i: int) -> dict:
        from mar3d.data.dataset import lru_get

        return lru_get(self._cache, self.cache_rows, i, lambda: self._load_row(i))

    def _load_row(self, i: int) -> dict:
        from mar3d.data.dataset import read_row_group
        from mar3d.data.schema import column_to_numpy

        table = read_row_group(self._files, *self.index[i], self.columns)
        return {name: column_to_numpy(table.column(name))[0] for name in self.columns}

    def sample(self, i: int, rng: np.random.Generator) -> dict:
        row = self.read_row(i)
        view = self.views[int(rng.integers(len(self.views)))]
        subset = int(rng.integers(self.num_subsets))
        return {k: np.array(row[k][view if k in FEATURE_KEYS else subset]) for k in self.columns}


def _ray_cached_samples(batch: dict, root: str, data: str, split: str, levels: tuple, rows: int,
                        cache_rows: int) -> dict:
    key = (root, data, split, levels)
    if key not in _READERS:  # one reader (and its open files) per Ray worker process
        _READERS[key] = FeatureCacheReader(root, data, split, levels, cache_rows)
    rng = np.random.default_rng()
    return stack_samples([_READERS[key].sample(int(i) % rows, rng) for i in batch["id"]])


def cached_ray_dataset(root: str | Path, data: str | Path, split: str, levels: tuple[str, ...],
                       repeats: int = 1, cache_rows: int = 128):
    """A shuffled ``ray.data.Dataset`` of cached training samples (see
    :class:`FeatureCacheReader`), every object listed ``repeats`` times per pass."""
    import ray.data

    rows = len(FeatureCacheReader(root, data, split, levels, cache_rows=0))  # refuses gaps up front
    ids = ray.data.range(rows * repeats).random_shuffle()
    return ids.map_batches(_ray_cached_samples, batch_size=SAMPLE_BATCH, batch_format="numpy",
                           fn_kwargs={"root": str(root), "data": str(data), "split": split,
                                      "levels": tuple(levels), "rows": rows, "cache_rows": cache_rows},
                           **storage.ray_task_options(root, data))
