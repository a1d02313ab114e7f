"""Readers of prepared shards: a torch Dataset and a Ray Data dataset with the same rows.

Each item holds random subsets of the stored samples (fresh per item and epoch):
``surface_0..surface_{K-1}`` float32 [n_k,6]; ``occ_points`` float32 [M,3] and
``occ_labels`` float32 [M] (a ``near_fraction`` of them near-surface, the rest uniform);
``image`` uint8 [H,W,4] (one view: random unless ``view_index`` is fixed) with its
``view_index``; ``rotation`` float32 [3,3]; ``uid``.

``split`` selects objects and views (:mod:`mar3d.data.splits`): ``"train"`` gives the
training objects and draws their random views among the training views only (never the
held-out view); ``"val"`` the held-out objects; ``"all"`` (default) everything.

``with_occupancy`` / ``with_image`` drop what a consumer does not read (MAR training needs
no occupancy, VAE training no image), so those columns are never decoded.
``root`` may be an ``s3://`` prefix (:mod:`mar3d.storage`): rows are then read with ranged
requests, one row group at a time, like local files.

``cache_rows`` keeps that many decoded rows per reader (least recently used first out):
a small dataset is then decoded once per reader process instead of once per sample,
which on CPUs is what limits the training step rate.

Rotation augmentation applies one uniform random rotation to surface points, their
normals and the occupancy points alike, so labels stay valid; the rotated shape is then
uniformly rescaled (if needed) to fit back into [-1,1]^3, which also keeps labels valid.
Images are not rotated: the camera poses of the stored views describe them.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from .. import storage
from .prepare import complete_shards, load_manifest
from .schema import column_to_numpy
from .splits import SPLITS, split_from_manifest


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniform rotation in SO(3): QR of a Gaussian matrix with the sign ambiguity fixed."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def read_row_group(files: dict, path: Path | str, group: int, columns: list[str]):
    """One row group of a shard as a table; ``files`` keeps each shard open (one handle
    per reader process)."""
    if path not in files:
        files[path] = _parquet_file(path)
    return files[path].read_row_group(group, columns=columns)


def lru_get(cache: OrderedDict, size: int, key, load):
    """``cache[key]``, loaded with ``load()`` on a miss; keeps at most ``size`` entries
    (least recently used first out; 0 keeps nothing)."""
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = load()
    if size:
        cache[key] = value
        while len(cache) > size:
            cache.popitem(last=False)
    return value


def _parquet_file(path: Path | str) -> pq.ParquetFile:
    # A remote shard stays open as one S3 input file: each row group is a ranged GET.
    return pq.ParquetFile(storage.open_input(path) if storage.is_remote(path) else path)


class ShapeDataset(torch.utils.data.Dataset):
    def __init__(self, root: str | Path, surface_sizes: tuple[int, ...] | None = None,
                 num_occ: int = 8192, near_fraction: float = 0.25, rotate: bool = False,
                 seed: int | None = 0, view_index: int | None = None, rescale_rotated: bool = True,
                 split: str = "all", with_occupancy: bool = True, with_image: bool = True,
                 cache_rows: int = 0):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.root = root if storage.is_remote(root) else Path(root)
        manifest = load_manifest(self.root)
        if manifest is None:
            raise FileNotFoundError(f"{self.root} has no manifest.json: run `mar3d data prepare` first")
        # Size checks only: hashing every shard on each open would be slow for big datasets.
        shards = complete_shards(self.root, manifest, verify=False)
        self.index: list[tuple[Path | str, int]] = []  # (shard path, row group) per row
        self.uids: list[str] = []
        self.sources: list[str | None] = []  # the rows' ``source`` label (None without one)
        for s in shards:
            path = storage.join(self.root, s["file"]) if storage.is_remote(self.root) else self.root / s["file"]
            shard = _parquet_file(path)
            meta = shard.metadata
            for g in range(meta.num_row_groups):
                if meta.row_group(g).num_rows != 1:
                    raise ValueError(f"{path}: row group {g} holds {meta.row_group(g).num_rows} rows; "
                                     "shards must have one row per row group")
                self.index.append((path, g))
            with_source = "source" in shard.schema_arrow.names  # older shards have no labels
            table = shard.read(columns=["uid", "source"] if with_source else ["uid"])
            self.uids += table.column("uid").to_pylist()
            self.sources += (table.column("source").to_pylist() if with_source
                             else [None] * table.num_rows)
        cfg = manifest["config"]
        self.split_info = split_from_manifest(manifest, self.uids)
        self.split = split
        if split != "all":
            keep = self.split_info.uids(split)
            kept = [(i, u, s) for i, u, s in zip(self.index, self.uids, self.sources) if u in keep]
            self.index = [i for i, _, _ in kept]
            self.uids = [u for _, u, _ in kept]
            self.sources = [s for _, _, s in kept]
        stored = tuple(cfg["surface_sizes"])
        self.surface_sizes = tuple(surface_sizes) if surface_sizes is not None else stored
        if len(self.surface_sizes) > len(stored) or any(
                n > m for n, m in zip(self.surface_sizes, stored)):
            raise ValueError(f"surface_sizes {self.surface_sizes} exceed the stored levels {stored}")
        if not 0.0 <= near_fraction <= 1.0:
            raise ValueError(f"near_fraction must be in [0, 1], got {near_fraction}")
        self.num_near = int(round(num_occ * near_fraction))
        self.num_vol = num_occ - self.num_near
        if self.num_vol > cfg["num_vol"] or self.num_near > cfg["num_near"]:
            raise ValueError(f"num_occ={num_occ} with near_fraction={near_fraction} needs {self.num_vol} "
                             f"volume / {self.num_near} near points; shards hold {cfg['num_vol']} / {cfg['num_near']}")
        if view_index is not None and not 0 <= view_index < cfg["render_views"]:
            raise ValueError(f"view_index {view_index} outside [0, {cfg['render_views']})")
        self.num_views = cfg["render_views"]
        # Random views of training objects come from the training views only.
        self.views = (self.split_info.training_views() if split == "train"
                      else list(range(self.num_views)))
        self.extent = float(cfg["normalize_extent"])
        self.up_axis = cfg.get("render_up_axis", "y")  # world up of the stored cameras
        self.rotate, self.seed, self.view_index = rotate, seed, view_index
        self.rescale_rotated = rescale_rotated
        self.with_occupancy, self.with_image = with_occupancy, with_image
        if cache_rows < 0:
            raise ValueError(f"cache_rows must be >= 0, got {cache_rows}")
        self.cache_rows = cache_rows
        self.epoch = 0
        self._files: dict[Path, pq.ParquetFile] = {}
        self._cache: OrderedDict[int, dict] = OrderedDict()

    def set_epoch(self, epoch: int) -> None:
        """Different random subsets / rotations per epoch with a fixed seed."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self):  # open file handles stay in their process
        state = self.__dict__.copy()
        state["_files"] = {}
        state["_cache"] = OrderedDict()
        return state

    def _columns(self) -> list[str]:
        columns = ["uid"] + [f"surface_{k}" for k in range(len(self.surface_sizes))]
        if self.with_occupancy:
            columns += ["vol_points", "vol_labels", "near_points", "near_labels"]
        if self.with_image:
            columns.append("images")
        return columns

    def read_row(self, idx: int) -> dict:
        """The stored row ``idx`` (all samples, no augmentation) as numpy arrays."""
        return lru_get(self._cache, self.cache_rows, idx, lambda: self._load_row(idx))

    def _load_row(self, idx: int) -> dict:
        path, group = self.index[idx]
        table = read_row_group(self._files, path, group, self._columns())
        row = {"uid": table.column("uid")[0].as_py()}
        for name in table.column_names[1:]:
            row[name] = column_to_numpy(table.column(name))[0]
        return row

    def sample(self, idx: int) -> dict:
        """One training example as numpy arrays (shared by the torch and Ray readers)."""
        if self.seed is None:
            rng = np.random.default_rng()
        else:
            rng = np.random.default_rng([self.seed, self.epoch, idx])
        row = self.read_row(idx)
        out = {}
        for k, n in enumerate(self.surface_sizes):
            level = row[f"surface_{k}"]
            out[f"surface_{k}"] = level[rng.choice(len(level), n, replace=False)]
        if self.with_occupancy:
            vol = rng.choice(len(row["vol_points"]), self.num_vol, replace=False)
            near = rng.choice(len(row["near_points"]), self.num_near, replace=False)
            out["occ_points"] = np.concatenate([row["vol_points"][vol], row["near_points"][near]])
            out["occ_labels"] = np.concatenate([row["vol_labels"][vol],
                                                row["near_labels"][near]]).astype(np.float32)
        rotation = np.eye(3)
        if self.rotate:
            rotation = random_rotation(rng)
            scale = 1.0
            for k in range(len(self.surface_sizes)):
                s = out[f"surface_{k}"]
                xyz, normals = s[:, :3] @ rotation.T, s[:, 3:] @ rotation.T
                out[f"surface_{k}"] = np.concatenate([xyz, normals], 1)
            if self.with_occupancy:
                out["occ_points"] = out["occ_points"] @ rotation.T
            if self.rescale_rotated:
                reach = np.abs(out["surface_0"][:, :3]).max()
                scale = min(1.0, self.extent / reach) if reach > 0 else 1.0
            if scale < 1.0:
                for k in range(len(self.surface_sizes)):
                    out[f"surface_{k}"][:, :3] *= scale
                if self.with_occupancy:
                    out["occ_points"] = out["occ_points"] * scale
            rotation = rotation * scale
        view = self.view_index if self.view_index is not None else self.views[int(rng.integers(len(self.views)))]
        if self.with_image:
            out["image"] = row["images"][view]
        out["view_index"] = np.int64(view)
        out["rotation"] = rotation
        for key, value in out.items():
            if isinstance(value, np.ndarray) and value.dtype == np.float64:
                out[key] = value.astype(np.float32)
        out["uid"] = row["uid"]
        return out

    def __getitem__(self, idx: int) -> dict:
        sample = self.sample(idx)
        # np.array copies: slices of Arrow buffers are read-only, torch wants writable memory.
        return {k: (v if isinstance(v, str) else torch.from_numpy(np.array(v)))
                for k, v in sample.items()}


_READERS: dict[tuple, ShapeDataset] = {}

# Row ids per Ray Data map call: a per-row map adds Ray Data's bookkeeping to every
# sample, and on a small CPU machine that work competes with the training workers.
SAMPLE_BATCH = 16


def stack_samples(samples: list[dict]) -> dict:
    """One Ray Data batch (name -> stacked array) from samples with the same keys."""
    return {k: np.stack([s[k] for s in samples]) for k in samples[0]}


def _ray_sample_batch(batch: dict, root: str, kwargs: tuple, rows: int, with_uid: bool) -> dict:
    """Ray Data map: row ids -> ShapeDataset samples (ids wrap around the dataset)."""
    key = (root, kwargs)
    if key not in _READERS:  # one reader (and its open files) per Ray worker process
        _READERS[key] = ShapeDataset(root, **dict(kwargs))
    samples = [_READERS[key].sample(int(i) % rows) for i in batch["id"]]
    if not with_uid:
        for sample in samples:
            sample.pop("uid")  # strings do not become tensors (iter_torch_batches)
    return stack_samples(samples)


def representative_order(dataset: ShapeDataset) -> list[int]:
    """Row indices in the split's stable hash order: the first N rows are a fixed,
    unbiased sample of the objects (dataset order is by name, i.e. by category)."""
    from .splits import split_score

    return sorted(range(len(dataset)), key=lambda i: (split_score(dataset.uids[i]), dataset.uids[i]))


def ray_dataset(root: str | Path, repeats: int = 1, shuffle: bool = False, with_uid: bool = True,
                **kwargs):
    """A ``ray.data.Dataset`` yielding ShapeDataset's rows (as numpy), each row listed
    ``repeats`` times per pass, optionally shuffled; ``kwargs`` go to ShapeDataset.

    With ``seed=None`` every pass (and every repeat) draws fresh subsets/rotations (Ray
    re-executes the map each epoch); with an int seed the rows are reproducible.
    """
    import ray.data

    reader = ShapeDataset(root, **kwargs)  # validates arguments and counts rows up front
    rows = len(reader)
    if not rows:
        raise ValueError(f"{root} has no complete shard rows")
    ids = ray.data.range(rows * repeats)
    if shuffle:
        ids = ids.random_shuffle()
    return ids.map_batches(_ray_sample_batch, batch_size=SAMPLE_BATCH, batch_format="numpy",
                           fn_kwargs={"root": str(root), "kwargs": tuple(sorted(kwargs.items())),
                                      "rows": rows, "with_uid": with_uid},
                           **storage.ray_task_options(root))
