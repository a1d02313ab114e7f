"""The constant mean-shape baseline: the line a model must clear to show it uses its image."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mar3d.evaluate.config import EvalConfig
from mar3d.evaluate.groups import EvalGroup
from mar3d.evaluate.scoring import strided
from mar3d.metrics import normalized_point_metrics, pairwise_chamfer


@dataclass
class MeanShape:
    """The constant baseline prediction: one training object's surface for every input."""
    uid: str
    points: np.ndarray
    normals: np.ndarray
    pool: int
    mean_chamfer: float


def mean_shape(reader, cfg: EvalConfig, pool: frozenset[str] | None = None) -> MeanShape | None:
    """The medoid (by Chamfer) of at most ``baseline_pool`` training objects (of ``pool``,
    default every training object)."""
    from mar3d.data.splits import split_score

    pool = reader.split_info.train if pool is None else pool
    train = sorted(pool, key=lambda u: (split_score(u), u))[: cfg.baseline_pool]
    if not train:
        return None
    position = {uid: i for i, uid in enumerate(reader.uids)}
    surfaces = [np.asarray(reader.read_row(position[u])["surface_0"], np.float64) for u in train]
    points = [strided(s[:, :3], cfg.retrieval_points) for s in surfaces]
    if len(train) == 1:
        best, mean = 0, 0.0
    else:
        means = pairwise_chamfer(points).sum(1) / (len(train) - 1)
        best, mean = int(np.argmin(means)), float(means.min())
    return MeanShape(train[best], surfaces[best][:, :3], surfaces[best][:, 3:], len(train), mean)


def baseline_record(shape: MeanShape, row: dict[str, Any], cfg: EvalConfig) -> dict[str, Any]:
    surface = np.asarray(row["surface"], np.float64)
    scores = normalized_point_metrics(shape.points, shape.normals, surface[:, :3], surface[:, 3:],
                                      cfg.fscore_threshold)
    return {"uid": row["uid"], "status": "ok", "error": "", **{k: float(v) for k, v in scores.items()}}


def _group_baselines(reader, cfg: EvalConfig, groups: list[EvalGroup]) -> dict[str, MeanShape]:
    """Each group's mean shape (one per distinct training pool); none when disabled."""
    if not cfg.baseline:
        return {}
    by_pool: dict[frozenset[str], MeanShape | None] = {}
    out = {}
    for group in groups:
        if group.training_pool not in by_pool:
            by_pool[group.training_pool] = mean_shape(reader, cfg, group.training_pool)
        if by_pool[group.training_pool] is not None:
            out[group.name] = by_pool[group.training_pool]
    return out
