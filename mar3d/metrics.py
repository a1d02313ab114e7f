"""Reconstruction metrics between a predicted and a ground-truth mesh.

Protocol (as in the MAR-3D / InstantMesh style GSO & OmniObject3D evaluations, made
explicit here):

* **Normalization** (``normalize=True``, default): one similarity transform, computed
  from the *ground truth* only, is applied to both meshes: centre the GT's axis-aligned
  bounding box at the origin and scale so its longest side is 2, i.e. the GT fits
  [-1, 1]^3 touching it on its longest axis. The prediction is therefore judged in
  the GT's frame (it is not re-fitted or aligned). With ``normalize=False`` the inputs
  are used as given.
* **Sampling**: ``num_points`` points (with face normals) are sampled uniformly by area
  from each surface, with a fixed seed.
* **Chamfer distance** (``chamfer_distance``): symmetric mean of *unsquared* Euclidean
  nearest-neighbour distances, ``(mean_p d(p, G) + mean_g d(g, P)) / 2``, in
  normalized units. Papers differ (squared, sum instead of mean, x1000 scaling): the
  paper's table values are not directly comparable with ours.
* **F-score** at ``threshold`` tau (default 0.05 in normalized units, i.e. 2.5% of the
  GT's longest side): harmonic mean of precision (fraction of predicted points within
  tau of the GT) and recall (fraction of GT points within tau of the prediction).
* **Normal consistency**: mean over both directions of ``|cos|`` between each point's
  normal and its nearest neighbour's normal on the other surface (orientation-free,
  since generated meshes may have flipped faces).
* **Edge Chamfer / edge normal consistency** (``edge_metrics``): the same two measures
  restricted to the band within ``distance`` of the GT's sharp edges (the caller passes
  the edge segments): GT points in the band -> nearest prediction point (completeness)
  and prediction points whose nearest GT point is in the band -> that point (accuracy),
  the mean of both directions, as for the whole surface.
* **Volume IoU**: uniform points in [-bounds, bounds]^3 (after normalization),
  inside/outside from libigl's generalized winding number (robust to the holes real
  scans and generated meshes have), IoU of the two inside sets.

Across the objects of one evaluation group (:mod:`mar3d.evaluate`), whether generated
shapes follow their condition:

* **Aggregation** (``aggregate``) of per-object records: a failed object (``status`` not
  ``ok``) counts 0 in the F-score / precision / recall / normal consistency / IoU means
  and is left out of the Chamfer mean (``num_scored`` / ``num_failed`` / ``failure_rate``
  say how many).
* **Cross-object Chamfer** (``cross_chamfer``, ``pairwise_chamfer``): the Chamfer distance
  above between every prediction and every ground truth of the group, in the frame the
  points are given in (no normalization); a failed prediction is a row of +inf.
* **Retrieval and diversity** (``following_metrics``): ``retrieval_top1`` is the share of
  objects whose own ground truth is their prediction's nearest (chance 1/N);
  ``diversity_ratio`` the mean pairwise Chamfer among the predictions over that among
  their ground truths (0 for a constant output).
* **Category accuracy** (``category_following``, ``per_category``): the share of objects
  whose nearest ground truth has their own category, next to the chance of that.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import trimesh
from scipy.spatial import cKDTree

DEFAULT_THRESHOLD = 0.05


def normalization_transform(gt_bounds: np.ndarray) -> np.ndarray:
    """4x4 similarity mapping the GT's bounding box centre to 0 and longest side to 2."""
    lo, hi = np.asarray(gt_bounds, dtype=np.float64)
    extent = (hi - lo).max()
    if not extent > 0:
        raise ValueError("ground truth has a degenerate (zero-size) bounding box")
    t = np.eye(4)
    t[:3, :3] *= 2.0 / extent
    t[:3, 3] = -(lo + hi) / 2.0 * (2.0 / extent)
    return t


def sample_surface(mesh: trimesh.Trimesh, num_points: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Area-uniform surface points and their (face) unit normals."""
    if len(mesh.faces) == 0:
        raise ValueError("cannot sample points from a mesh with no faces")
    points, face_index = trimesh.sample.sample_surface(mesh, num_points, seed=seed)
    return np.asarray(points, np.float64), np.asarray(mesh.face_normals[face_index], np.float64)


def _nearest(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    distances, indices = cKDTree(target).query(source, k=1, workers=-1)
    return distances, indices


def _precision_recall_f(d_pred: np.ndarray, d_gt: np.ndarray, threshold: float) -> tuple[float, float, float]:
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    precision = float((d_pred < threshold).mean())
    recall = float((d_gt < threshold).mean())
    f = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return f, precision, recall


def _mean_abs_cos(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True).clip(1e-12)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True).clip(1e-12)
    return float(np.abs((a * b).sum(-1)).mean())


def chamfer_distance(pred_points: np.ndarray, gt_points: np.ndarray) -> float:
    """Symmetric mean of unsquared nearest-neighbour distances (see module doc)."""
    d_pred, _ = _nearest(pred_points, gt_points)
    d_gt, _ = _nearest(gt_points, pred_points)
    return float(0.5 * (d_pred.mean() + d_gt.mean()))


def f_score(pred_points: np.ndarray, gt_points: np.ndarray,
            threshold: float = DEFAULT_THRESHOLD) -> tuple[float, float, float]:
    """(F-score, precision, recall) at distance ``threshold``."""
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    d_pred, _ = _nearest(pred_points, gt_points)
    d_gt, _ = _nearest(gt_points, pred_points)
    return _precision_recall_f(d_pred, d_gt, threshold)


def normal_consistency(pred_points: np.ndarray, pred_normals: np.ndarray,
                       gt_points: np.ndarray, gt_normals: np.ndarray) -> float:
    """Mean |cos| between normals of nearest neighbours, averaged over both directions."""
    _, i_pred = _nearest(pred_points, gt_points)
    _, i_gt = _nearest(gt_points, pred_points)
    return 0.5 * (_mean_abs_cos(pred_normals, gt_normals[i_pred])
                  + _mean_abs_cos(gt_normals, pred_normals[i_gt]))


def point_metrics(pred_points: np.ndarray, pred_normals: np.ndarray, gt_points: np.ndarray,
                  gt_normals: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
    """All surface metrics from sampled points, with one nearest-neighbour query per direction."""
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    d_pred, i_pred = _nearest(pred_points, gt_points)
    d_gt, i_gt = _nearest(gt_points, pred_points)
    f, precision, recall = _precision_recall_f(d_pred, d_gt, threshold)
    return {
        "chamfer": float(0.5 * (d_pred.mean() + d_gt.mean())),
        "f_score": f, "precision": precision, "recall": recall,
        "normal_consistency": 0.5 * (_mean_abs_cos(pred_normals, gt_normals[i_pred])
                                     + _mean_abs_cos(gt_normals, pred_normals[i_gt])),
    }


def normalized_point_metrics(pred_points: np.ndarray, pred_normals: np.ndarray, gt_points: np.ndarray,
                             gt_normals: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
    """:func:`point_metrics` after the GT-bounding-box normalization of the module doc
    (for predictions that are point sets already, e.g. a baseline shape's samples)."""
    t = normalization_transform(np.stack([gt_points.min(0), gt_points.max(0)]))
    move = lambda p: np.asarray(p, np.float64) @ t[:3, :3].T + t[:3, 3]  # noqa: E731
    return point_metrics(move(pred_points), pred_normals, move(gt_points), gt_normals, threshold)


def segment_distance(points: np.ndarray, segments: np.ndarray, max_distance: float) -> np.ndarray:
    """Exact Euclidean distance of each point to the nearest of ``segments`` [E, 2, 3] where
    it is <= ``max_distance``; inf elsewhere (and for every point if there are no segments)."""
    if max_distance <= 0:
        raise ValueError(f"max_distance must be > 0, got {max_distance}")
    points = np.asarray(points, np.float64)
    out = np.full(len(points), np.inf)
    if len(points) == 0 or len(segments) == 0:
        return out
    a, b = np.asarray(segments, np.float64)[:, 0], np.asarray(segments, np.float64)[:, 1]
    # Pieces no longer than max_distance: a point within max_distance of a piece is within
    # 1.5 * max_distance of its midpoint, so a radius search on midpoints finds every candidate.
    pieces = np.maximum(1, np.ceil(np.linalg.norm(b - a, axis=1) / max_distance)).astype(np.int64)
    seg = np.repeat(np.arange(len(a)), pieces)
    k = np.arange(len(seg)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    step = (b - a)[seg] / pieces[seg, None]
    start = a[seg] + step * k[:, None]
    pairs = cKDTree(points).sparse_distance_matrix(
        cKDTree(start + step / 2), 1.5 * max_distance, output_type="ndarray")
    if len(pairs) == 0:
        return out
    i, j = pairs["i"], pairs["j"]
    offset = points[i] - start[j]
    t = np.clip((offset * step[j]).sum(1) / np.maximum((step[j] ** 2).sum(1), 1e-30), 0.0, 1.0)
    np.minimum.at(out, i, np.linalg.norm(offset - t[:, None] * step[j], axis=1))
    out[out > max_distance] = np.inf
    return out


def edge_metrics(pred_points: np.ndarray, pred_normals: np.ndarray, gt_points: np.ndarray,
                 gt_normals: np.ndarray, segments: np.ndarray, distance: float) -> dict[str, float]:
    """Chamfer distance and normal consistency near the GT's sharp ``segments`` (module doc).

    The band: GT points within ``distance`` of a segment, and the prediction points whose
    nearest GT point lies in it (so a rounded-off or bulging edge still has prediction
    points scored against it). ``edge_completeness``: mean distance of the GT band to the
    prediction; ``edge_accuracy``: mean distance of the prediction's band to the GT;
    ``edge_chamfer`` their mean; ``edge_nc`` the mean |cos| of nearest-neighbour normals
    over the same two sets. An empty set (no sharp edge, an empty prediction) makes the
    metrics that need it NaN."""
    gt_band = np.isfinite(segment_distance(gt_points, segments, distance))
    nan = float("nan")
    out = {"edge_gt_points": int(gt_band.sum()), "edge_pred_points": 0, "edge_completeness": nan,
           "edge_accuracy": nan, "edge_chamfer": nan, "edge_nc": nan}
    if not gt_band.any() or len(pred_points) == 0:
        return out
    d_gt, i_gt = _nearest(gt_points[gt_band], pred_points)
    d_pred, i_pred = _nearest(pred_points, gt_points)
    pred_band = gt_band[i_pred]
    out["edge_pred_points"] = int(pred_band.sum())
    out["edge_completeness"] = float(d_gt.mean())
    if pred_band.any():
        out["edge_accuracy"] = float(d_pred[pred_band].mean())
        out["edge_chamfer"] = 0.5 * (out["edge_completeness"] + out["edge_accuracy"])
        out["edge_nc"] = 0.5 * (_mean_abs_cos(gt_normals[gt_band], pred_normals[i_gt])
                                + _mean_abs_cos(pred_normals[pred_band], gt_normals[i_pred[pred_band]]))
    return out


def inside_mask(mesh: trimesh.Trimesh, points: np.ndarray) -> np.ndarray:
    """Inside test by generalized winding number (> 1/2), robust to small holes."""
    import igl

    w = igl.fast_winding_number(np.ascontiguousarray(mesh.vertices, np.float64),
                                np.ascontiguousarray(mesh.faces, np.int64),
                                np.ascontiguousarray(points, np.float64))
    return w > 0.5


def volume_iou(pred: trimesh.Trimesh, gt: trimesh.Trimesh, num_points: int = 100_000,
               bounds: float = 1.05, seed: int = 0) -> float:
    """IoU of the inside sets of two meshes on uniform points in [-bounds, bounds]^3."""
    points = np.random.default_rng(seed).uniform(-bounds, bounds, size=(num_points, 3))
    a = inside_mask(pred, points) if len(pred.faces) else np.zeros(num_points, bool)
    b = inside_mask(gt, points)
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


def mesh_metrics(pred: trimesh.Trimesh, gt: trimesh.Trimesh | tuple[np.ndarray, np.ndarray],
                 num_points: int = 100_000, threshold: float = DEFAULT_THRESHOLD,
                 normalize: bool = True, with_volume_iou: bool = False, seed: int = 0) -> dict[str, float]:
    """Chamfer distance, F-score (+ precision, recall) and normal consistency of ``pred``
    against ``gt`` (a mesh, or a ``(points, normals)`` pair already sampled from it), and
    optionally volume IoU (needs a GT mesh). See the module doc for the protocol.

    A prediction with no faces scores F = 0, NC = 0, CD = inf (not an exception: a
    failed generation is a result to report)."""
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    gt_is_mesh = isinstance(gt, trimesh.Trimesh)
    if not gt_is_mesh:
        gt_points, gt_normals = (np.asarray(a, np.float64) for a in gt)
        if gt_points.ndim != 2 or gt_points.shape[1] != 3 or gt_normals.shape != gt_points.shape:
            raise ValueError("gt points and normals must both be [N, 3]")
        if with_volume_iou:
            raise ValueError("volume IoU needs a ground-truth mesh, not points")
        gt_bounds = np.stack([gt_points.min(0), gt_points.max(0)])
    else:
        gt_bounds = gt.bounds
    pred = pred.copy()
    if normalize:
        t = normalization_transform(gt_bounds)
        pred.apply_transform(t)
        if gt_is_mesh:
            gt = gt.copy()
            gt.apply_transform(t)
        else:
            gt_points = gt_points @ t[:3, :3].T + t[:3, 3]  # normals unchanged by a similarity
    if gt_is_mesh:
        gt_points, gt_normals = sample_surface(gt, num_points, seed=seed)
    if len(pred.faces) == 0:
        out = {"chamfer": float("inf"), "f_score": 0.0, "precision": 0.0, "recall": 0.0,
               "normal_consistency": 0.0}
        if with_volume_iou:
            out["volume_iou"] = volume_iou(pred, gt, seed=seed)
        return out
    # Same seed for both: identical meshes give identical samples (CD exactly 0).
    pred_points, pred_normals = sample_surface(pred, num_points, seed=seed)
    out = point_metrics(pred_points, pred_normals, gt_points, gt_normals, threshold)
    if with_volume_iou:
        out["volume_iou"] = volume_iou(pred, gt, seed=seed)
    return out


def aggregate(per_object: list[dict[str, Any]]) -> dict[str, float]:
    """Aggregate metrics of per-object records under the failure rule of the module doc."""
    n = len(per_object)
    if n == 0:
        raise ValueError("no objects were evaluated")
    scored = [r for r in per_object if r["status"] == "ok"]
    out: dict[str, float] = {"num_objects": float(n), "num_scored": float(len(scored)),
                             "num_failed": float(n - len(scored)),
                             "failure_rate": (n - len(scored)) / n}
    out["chamfer"] = float(np.mean([r["chamfer"] for r in scored])) if scored else math.inf
    for key in ("f_score", "precision", "recall", "normal_consistency", "iou", "vae_iou"):
        values = [r.get(key) for r in per_object]
        if all(v is not None for v in values):  # absent where not measured (e.g. with_iou off)
            out[key] = float(np.mean(values))
    if "seconds" in per_object[0]:
        out["seconds_per_object"] = float(np.mean([r["seconds"] for r in per_object]))
    return out


def cross_chamfer(predictions: list[np.ndarray | None], truths: list[np.ndarray]) -> np.ndarray:
    """[N, M] Chamfer distance (as :func:`chamfer_distance`) of every
    prediction (points, or None for a failure: a row of +inf) to every ground truth.
    One KD-tree per point set, so N x M costs N x M queries, not N x M tree builds."""
    matrix = np.full((len(predictions), len(truths)), math.inf)
    ok = [i for i, p in enumerate(predictions) if p is not None and len(p)]
    if not ok or not truths:
        return matrix
    truth_trees = [cKDTree(t) for t in truths]
    done: dict[int, int] = {}  # a prediction given several times (a constant) is scored once
    for i in ok:
        if id(predictions[i]) in done:
            matrix[i] = matrix[done[id(predictions[i])]]
            continue
        done[id(predictions[i])] = i
        tree = cKDTree(predictions[i])
        for j, truth in enumerate(truths):
            to_truth = truth_trees[j].query(predictions[i], k=1, workers=-1)[0].mean()
            to_pred = tree.query(truth, k=1, workers=-1)[0].mean()
            matrix[i, j] = 0.5 * (to_truth + to_pred)
    return matrix


def pairwise_chamfer(points: list[np.ndarray]) -> np.ndarray:
    """[N, N] Chamfer distance among one list of point sets (as :func:`cross_chamfer` of
    the list with itself): the distance is symmetric, so each pair is computed once."""
    trees = [cKDTree(p) for p in points]
    matrix = np.zeros((len(points), len(points)))
    for i, j in zip(*np.triu_indices(len(points), k=1)):
        if points[i] is points[j]:  # one set given twice (a constant prediction)
            continue
        to_j = trees[j].query(points[i], k=1, workers=-1)[0].mean()
        to_i = trees[i].query(points[j], k=1, workers=-1)[0].mean()
        matrix[i, j] = matrix[j, i] = 0.5 * (to_j + to_i)
    return matrix


def following_metrics(matrix: np.ndarray, predictions: list[np.ndarray | None],
                      truths: list[np.ndarray], truth_pairs: np.ndarray | None = None
                      ) -> dict[str, float | None]:
    """Top-1 retrieval from a square prediction x truth Chamfer matrix, and the diversity
    ratio over the objects whose prediction exists (None below two of them).
    ``truth_pairs``: :func:`pairwise_chamfer` of ``truths`` when already computed."""
    n = len(truths)
    hits = sum(bool(np.isfinite(matrix[i]).any()) and int(np.argmin(matrix[i])) == i for i in range(n))
    ok = [i for i in range(n) if predictions[i] is not None and len(predictions[i])]
    diversity = None
    if len(ok) >= 2:
        upper = np.triu_indices(len(ok), k=1)
        generated = pairwise_chamfer([predictions[i] for i in ok])[upper].mean()
        spread = (truth_pairs[np.ix_(ok, ok)] if truth_pairs is not None
                  else pairwise_chamfer([truths[i] for i in ok]))[upper].mean()
        diversity = float(generated / spread) if spread > 0 else None
    return {"retrieval_hits": float(hits), "retrieval_top1": hits / n if n else 0.0,
            "retrieval_chance": 1.0 / n if n else 0.0, "diversity_ratio": diversity}


def category_hits(matrix: np.ndarray, categories: list[str | None], members: Any = None) -> int:
    """How many of ``members`` (default: all rows of the square prediction x truth Chamfer
    matrix) have a nearest ground truth of their own category (a failed prediction misses)."""
    members = range(len(categories)) if members is None else members
    return sum(bool(np.isfinite(matrix[i]).any()) and categories[int(np.argmin(matrix[i]))] == categories[i]
               for i in members)


def category_following(matrix: np.ndarray, categories: list[str | None]) -> dict[str, float]:
    """Category accuracy: the share of objects whose nearest ground truth of the group has
    the object's own category; ``category_chance`` is what nearest ground truths drawn at
    random would score. Empty when some object has no category (a dataset without labels)."""
    n = len(categories)
    if n == 0 or any(c is None for c in categories):
        return {}
    hits = category_hits(matrix, categories)
    shares = np.unique(np.asarray(categories, dtype=object), return_counts=True)[1] / n
    return {"category_hits": float(hits), "category_accuracy": hits / n,
            "category_chance": float((shares ** 2).sum())}


def per_category(categories: list[str], scored: dict[str, tuple[np.ndarray, list[dict[str, Any]]]]
                 ) -> list[dict[str, Any]]:
    """One row per category of a group: objects, then for each scored model (``scored``:
    column prefix -> (Chamfer matrix, per-object records)) its mean F-score, Chamfer and
    category accuracy over the category's objects."""
    rows = []
    for category in sorted(set(categories)):
        members = [i for i, c in enumerate(categories) if c == category]
        row: dict[str, Any] = {"category": category, "objects": len(members)}
        for prefix, (matrix, records) in scored.items():
            means = aggregate([records[i] for i in members])
            row.update({f"{prefix}f_score": means["f_score"], f"{prefix}chamfer": means["chamfer"],
                        f"{prefix}category_accuracy": category_hits(matrix, categories, members) / len(members)})
        rows.append(row)
    return rows
