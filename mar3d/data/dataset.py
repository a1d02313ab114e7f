"""Readers of prepared shards: a torch Dataset and a Ray Data dataset with the same rows.

Each item holds random subsets of the stored samples (fresh per item and epoch):
``surface_0..surface_{K-1}`` float32 [n_k,6]; ``occ_points`` float32 [M,3] and
``occ_labels`` float32 [M] (a ``near_fraction`` of them near-surface, the rest uniform);
``image`` uint8 [H,W,4] (one view: random unless ``view_index`` is fixed) with its
``view_index``; ``rotation`` float32 [3,3]; ``uid``.

Rotation augmentation applies one uniform random rotation to surface points, their
normals and the occupancy points alike, so labels stay valid; the rotated shape is then
uniformly rescaled (if needed) to fit back into [-1,1]^3, which also keeps labels valid.
Images are not rotated: the camera poses of the stored views describe them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from .prepare import complete_shards, load_manifest
from .schema import column_to_numpy


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniform rotation in SO(3): QR of a Gaussian matrix with the sign ambiguity fixed."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


class ShapeDataset(torch.utils.data.Dataset):
    def __init__(self, root: str | Path, surface_sizes: tuple[int, ...] | None = None,
                 num_occ: int = 8192, near_fraction: float = 0.25, rotate: bool = False,
                 seed: int | None = 0, view_index: int | None = None, rescale_rotated: bool = True):
        self.root = Path(root)
        manifest = load_manifest(self.root)
        if manifest is None:
            raise FileNotFoundError(f"{self.root} has no manifest.json: run `mar3d data prepare` first")
        # Size checks only: hashing every shard on each open would be slow for big datasets.
        shards = complete_shards(self.root, manifest, verify=False)
        self.index: list[tuple[Path, int]] = []  # (shard path, row group) per row
        for s in shards:
            path = self.root / s["file"]
            meta = pq.ParquetFile(path).metadata
            for g in range(meta.num_row_groups):
                if meta.row_group(g).num_rows != 1:
                    raise ValueError(f"{path}: row group {g} holds {meta.row_group(g).num_rows} rows; "
                                     "shards must have one row per row group")
                self.index.append((path, g))
        cfg = manifest["config"]
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
        self.extent = float(cfg["normalize_extent"])
        self.rotate, self.seed, self.view_index = rotate, seed, view_index
        self.rescale_rotated = rescale_rotated
        self.epoch = 0
        self._files: dict[Path, pq.ParquetFile] = {}

    def set_epoch(self, epoch: int) -> None:
        """Different random subsets / rotations per epoch with a fixed seed."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self):  # open file handles stay in their process
        state = self.__dict__.copy()
        state["_files"] = {}
        return state

    def _columns(self) -> list[str]:
        return ["uid", "vol_points", "vol_labels", "near_points", "near_labels", "images"] + [
            f"surface_{k}" for k in range(len(self.surface_sizes))]

    def read_row(self, idx: int) -> dict:
        """The stored row ``idx`` (all samples, no augmentation) as numpy arrays."""
        path, group = self.index[idx]
        if path not in self._files:
            self._files[path] = pq.ParquetFile(path)
        table = self._files[path].read_row_group(group, columns=self._columns())
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
        vol = rng.choice(len(row["vol_points"]), self.num_vol, replace=False)
        near = rng.choice(len(row["near_points"]), self.num_near, replace=False)
        out["occ_points"] = np.concatenate([row["vol_points"][vol], row["near_points"][near]])
        out["occ_labels"] = np.concatenate([row["vol_labels"][vol], row["near_labels"][near]]).astype(np.float32)
        rotation = np.eye(3)
        if self.rotate:
            rotation = random_rotation(rng)
            scale = 1.0
            for k in range(len(self.surface_sizes)):
                s = out[f"surface_{k}"]
                xyz, normals = s[:, :3] @ rotation.T, s[:, 3:] @ rotation.T
                out[f"surface_{k}"] = np.concatenate([xyz, normals], 1)
            out["occ_points"] = out["occ_points"] @ rotation.T
            if self.rescale_rotated:
                reach = np.abs(out["surface_0"][:, :3]).max()
                scale = min(1.0, self.extent / reach) if reach > 0 else 1.0
            if scale < 1.0:
                for k in range(len(self.surface_sizes)):
                    out[f"surface_{k}"][:, :3] *= scale
                out["occ_points"] = out["occ_points"] * scale
            rotation = rotation * scale
        view = self.view_index if self.view_index is not None else int(rng.integers(self.num_views))
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


def _ray_sample(item: dict, root: str, kwargs: tuple) -> dict:
    key = (root, kwargs)
    if key not in _READERS:  # one reader (and its open files) per Ray worker process
        _READERS[key] = ShapeDataset(root, **dict(kwargs))
    return _READERS[key].sample(int(item["index"]))


def ray_dataset(root: str | Path, **kwargs):
    """A ``ray.data.Dataset`` yielding ShapeDataset's rows (as numpy) for Ray Train.

    With ``seed=None`` every pass draws fresh subsets/rotations (Ray re-executes the map
    each epoch); with an int seed the rows are reproducible.
    """
    import ray.data

    reader = ShapeDataset(root, **kwargs)  # validates arguments and counts rows up front
    items = [{"index": i} for i in range(len(reader))]
    if not items:
        raise ValueError(f"{root} has no complete shard rows")
    return ray.data.from_items(items).map(
        _ray_sample, fn_kwargs={"root": str(root), "kwargs": tuple(sorted(kwargs.items()))})
