"""Evaluation of generated shapes on held-out views and held-out objects, logged to MLflow.

    result = evaluate("models:/mar3d@candidate", "data/ycb", "out/eval", EvalConfig())

The prepared dataset carries its own split (:mod:`mar3d.data.splits`): training objects
(each with one rendered view training never saw) and validation objects training never
saw at all. Evaluation scores **groups** of objects, each reported on its own:

* ``seen_view`` -- training objects, conditioned on their held-out view: does the model
  recognise an object it learned from a view it was not shown? With
  ``distinct_families`` one object per shape family (YCB's ``065-a`` .. ``065-j`` cups
  are one family), so the group is not a set of near-duplicates.
* ``heldout_objects`` -- validation objects (same view): does it generalise?
* ``synth_heldout`` -- validation objects of the procedural corpus (rows with source
  ``mar3d-synth``, :mod:`mar3d.data.synth`): new instances of the categories training
  learned from. In a dataset that mixes the corpus with other objects (scans), the two
  groups above take only the other objects, so each collection is scored on its own.
* ``all_objects`` -- every object of the dataset (for a dataset that is held out as a
  whole, e.g. another collection).

Objects are taken in the split's stable hash order, at most ``max_objects`` per group.

For every object the condition image goes through
:class:`~mar3d.inference.MAR3DPipeline` and the generated mesh is scored against the
stored ground truth. Per group, next to the model ("candidate"):

* **Baseline** ``baseline``: a constant "mean shape" prediction, the same for every
  input -- the training object whose surface is nearest (Chamfer) to all other training
  objects on average (the medoid of at most ``baseline_pool`` of them). A model that
  ignores its input and outputs one shape cannot beat the best constant shape by much,
  so this is the line a model must clear to show that it uses its image.
* **Condition following**: the Chamfer distance of every generated mesh to every ground
  truth of its group. ``retrieval_top1`` = fraction of objects whose own ground truth is
  the nearest (chance 1/N); ``diversity_ratio`` = mean pairwise Chamfer among the
  generated meshes / among their ground truths (0 for a constant output, about 1 when
  outputs differ as much as the objects do).
* **Champion** (``compare_to``): the current champion release, generated and scored on
  the same objects with the same settings, so the promotion gate compares like with like.

Protocol:

* **Frame, no alignment search.** The models are trained in the dataset's canonical
  frame (every mesh centred and scaled into [-1, 1]^3, never rotated to the view), so a
  generated shape lives in the same frame as its ground truth and is compared as is.
  Per-object scores normalize both by the ground truth's bounding box
  (:func:`mar3d.metrics.mesh_metrics`); the cross-object Chamfer matrices use the
  dataset frame itself (already normalized), so that every row compares distances in
  one frame.
* **Ground truth** is the stored ``surface_0`` points and normals (sampled from the
  watertight mesh the VAE learned from); ``num_points`` points are sampled from the
  generated mesh. Chamfer distance (unsquared, mean of both directions), F-score at
  ``fscore_threshold`` and normal consistency follow :mod:`mar3d.metrics`.
* **IoU** on the stored uniform ``vol_points`` / ``vol_labels``: the decoder's occupancy
  of the generated latents (logit > 0). ``vae_iou`` is the same for the VAE's own
  reconstruction of the ground-truth surface: the ceiling the generator can reach.
* **Failures** are results. An object whose generation raises, whose mesh is empty or
  whose metrics are not finite is recorded with ``status="failed"`` and the reason in
  ``error``; it counts 0 in the F-score / normal consistency / IoU / precision / recall
  means and as a retrieval miss, and is left out of the Chamfer mean (reported with
  ``num_scored`` / ``num_failed`` / ``failure_rate``).

Results go to ``output/`` (``report.json``, ``per_object.csv``, ``contact_sheets/<group>.png``,
``previews/*.png``, ``chamfer_<group>.csv``; ``output`` may be an ``s3://`` prefix, see
:func:`_evaluate_to_remote`) and to one MLflow run in ``cfg.experiment``:
params (flattened config, model URI, dataset path and content hash), metrics named
``<group>/<metric>``, ``<group>/baseline/<metric>``, ``<group>/champion/<metric>``,
the per-object table and every file above. With ``release_uri`` the metrics are also
attached to that registry release, where the promotion gate reads them.
"""
from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
import math
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mar3d import storage
from mar3d.config import flatten, to_dict
from mar3d.inference import GenerateConfig, MAR3DPipeline
from mar3d.logs import progress_bar
from mar3d.metrics import DEFAULT_THRESHOLD, mesh_metrics, normalized_point_metrics
from mar3d.models.vae import occupancy_iou

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"
TABLE_FILE = "per_object.csv"
PREVIEW_DIR = "previews"
SHEET_DIR = "contact_sheets"
GROUPS = ("seen_view", "heldout_objects", "synth_heldout", "all_objects")
GROUP_DESCRIPTIONS = {
    "seen_view": "training objects, seen from the view training never showed",
    "heldout_objects": "objects training never saw",
    "synth_heldout": "procedural corpus objects training never saw",
    "all_objects": "every object of the dataset",
}
SCORE_KEYS = ("chamfer", "f_score", "precision", "recall", "normal_consistency", "iou")
# Failed objects enter the all-object means with these values (see the module doc).
FAILED_SCORES = {"chamfer": None, "f_score": 0.0, "precision": 0.0, "recall": 0.0,
                 "normal_consistency": 0.0, "iou": 0.0}
_SHARD_COLUMNS = ["uid", "surface_0", "vol_points", "vol_labels", "images",
                  "cam_world_to_cam", "cam_intrinsics"]
# Labels carried into the per-object records, so scores can be joined back to Objaverse
# uids and compared by category (null for datasets without them).
_RECORD_LABELS = ("source_uid", "category")


@dataclass
class EvalConfig:
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    groups: tuple[str, ...] = ("seen_view", "heldout_objects")
    view_index: int | None = None        # condition view; None = the dataset's held-out view
    max_objects: int | None = None       # per group, in the split's hash order; None = all
    group_max_objects: dict[str, int] = field(default_factory=dict)  # per-group max_objects
    distinct_families: bool = True       # seen_view: one object per shape family
    seed: int = 0                        # sampling seed, the same for every object
    batch_size: int = 8                  # objects sampled together (results do not depend on it)
    num_points: int = 50_000             # points sampled from each generated mesh
    fscore_threshold: float = DEFAULT_THRESHOLD
    with_iou: bool = True
    with_vae_iou: bool = True            # also score the VAE's reconstruction (the ceiling)
    baseline: bool = True                # the constant mean-shape prediction, per group
    baseline_pool: int = 256             # training objects the mean shape is chosen among
    retrieval_points: int = 4096         # points per shape in the cross-object Chamfer matrices
    previews: int = 4                    # detailed preview images for the first N of each group
    preview_resolution: int = 256
    contact_sheet: bool = True           # one PNG grid per group (input | generated | truth)
    contact_sheet_resolution: int = 128
    experiment: str = "mar3d-eval"
    run_name: str = ""                   # "" = "eval-<dataset folder name>"
    device: str = "auto"                 # "auto" | "cpu" | "cuda" | "cuda:N"

    def validate(self) -> None:
        self.generate.validate()
        if not self.groups or len(set(self.groups)) != len(self.groups):
            raise ValueError(f"groups must list distinct values of {GROUPS}, got {list(self.groups)}")
        bad = [g for g in self.groups if g not in GROUPS]
        if bad:
            raise ValueError(f"unknown evaluation groups {bad}; choose from {GROUPS}")
        if self.view_index is not None and self.view_index < 0:
            raise ValueError(f"view_index must be >= 0 or null, got {self.view_index}")
        if self.max_objects is not None and self.max_objects < 1:
            raise ValueError(f"max_objects must be >= 1 or null, got {self.max_objects}")
        for name, count in self.group_max_objects.items():
            if name not in GROUPS:
                raise ValueError(f"group_max_objects names unknown group {name!r}; choose from {GROUPS}")
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise ValueError(f"group_max_objects[{name}] must be an integer >= 1, got {count!r}")
        for name in ("num_points", "baseline_pool", "retrieval_points", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.fscore_threshold) and self.fscore_threshold > 0):
            raise ValueError(f"fscore_threshold must be > 0, got {self.fscore_threshold}")
        if self.previews < 0:
            raise ValueError(f"previews must be >= 0, got {self.previews}")
        for name in ("preview_resolution", "contact_sheet_resolution"):
            if not 32 <= getattr(self, name) <= 2048:
                raise ValueError(f"{name} must be in [32, 2048], got {getattr(self, name)}")
        if not self.experiment:
            raise ValueError("experiment must be a non-empty MLflow experiment name")
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass
class EvalResult:
    metrics: dict[str, float]            # flat: "<group>/<metric>", "<group>/baseline/<metric>", ...
    per_object: list[dict[str, Any]]     # the candidate's rows of every group
    report_path: Path | str             # a local file, or its URI when the output is remote
    run_id: str
    failed: list[dict[str, Any]]         # the per-object rows with status "failed"
    tracking_uri: str = ""
    contact_sheets: dict[str, Path | str] = field(default_factory=dict)


# ------------------------------------------------------------------------------ models
def assemble_release_dir(vae_uri: str, lr_uri: str, hr_uri: str | None, dest: str | Path,
                         tracking_uri: str | None = None) -> Path:
    """One release folder (``dest/vae``, ``dest/cond``, ``dest/lr``, ``dest/hr``) from
    separately given components (local folders or ``runs:/`` / ``models:/`` URIs), so that
    evaluating components that were never registered as a release goes through the same
    loading path as a release. The image encoder (``cond``) is the one MAR-LR records it
    was trained with. Remote components are
    downloaded under ``dest/.download``; every component becomes a symlink to its folder
    (nothing is copied)."""
    from mar3d.registry import read_model_config, trained_conditioner

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for component, uri in (("vae", vae_uri), ("lr", lr_uri), ("hr", hr_uri)):
        _link_component(dest, component, uri, tracking_uri)
    stages = {c: str(dest / c) for c in ("lr", "hr") if (dest / c).is_dir()}
    conditioner = trained_conditioner(stages, read_model_config)
    _link_component(dest, "cond", conditioner, tracking_uri)
    return dest


def _link_component(dest: Path, component: str, uri: str | None, tracking_uri: str | None) -> None:
    from mar3d.registry import resolve_model_dir

    link = dest / component
    if link.is_symlink() or link.exists():
        raise FileExistsError(f"{link} already exists; give an empty destination folder")
    if uri is None:
        return
    if Path(uri).is_dir():
        folder = Path(uri)
    else:
        download = dest / ".download" / component
        download.mkdir(parents=True)
        folder = resolve_model_dir(uri, tracking_uri=tracking_uri, dst=download)
    link.symlink_to(Path(folder).resolve(), target_is_directory=True)


# ----------------------------------------------------------------------------- dataset
def dataset_fingerprint(root: str | Path) -> dict[str, Any]:
    """Content identity of a prepared dataset: sha256 over its complete shards' hashes
    (the manifest's timestamps change on every re-run, the shard contents do not)."""
    from mar3d.data.prepare import complete_shards, load_manifest, watertight_method

    manifest = load_manifest(root)
    if manifest is None:
        raise FileNotFoundError(f"{root} has no manifest.json: run `mar3d data prepare` first")
    shards = complete_shards(root, manifest, verify=False)
    listing = sorted((s["file"], s["sha256"], int(s["rows"])) for s in shards)
    digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    return {"hash": digest, "rows": sum(r for _, _, r in listing), "shards": len(listing),
            "schema_version": manifest.get("schema_version"),
            "watertight_method": watertight_method(manifest)}


@dataclass
class EvalGroup:
    name: str
    view: int
    indices: list[int]                   # rows of the dataset reader
    uids: list[str]
    view_seen_in_training: bool = False  # true only for a dataset without a held-out view
    # The training objects of the group's collection: its mean-shape baseline is chosen
    # among them (a corpus group gets a corpus shape, a scan group a scan).
    training_pool: frozenset[str] = frozenset()


def group_pools(reader) -> dict[str, tuple[frozenset[str], frozenset[str]]]:
    """(objects to score, training pool of their collection) of every group: corpus rows
    (source ``mar3d-synth``) form synth_heldout; seen_view and heldout_objects take the
    other rows, or every row of a dataset that is all corpus."""
    from mar3d.data.synth import SYNTH_SOURCE

    split = reader.split_info
    corpus = frozenset(u for u, src in zip(reader.uids, reader.sources) if src == SYNTH_SOURCE)
    everything = split.train | split.val
    others = (everything - corpus) or everything
    return {"seen_view": (split.train & others, split.train & others),
            "heldout_objects": (split.val & others, split.train & others),
            "synth_heldout": (split.val & corpus, split.train & corpus),
            "all_objects": (everything, split.train)}


def select_groups(reader, cfg: EvalConfig) -> list[EvalGroup]:
    """The objects of each group (see the module doc), from a split-"all" ShapeDataset."""
    from mar3d.data.splits import shape_family, split_score

    split = reader.split_info
    view = split.evaluation_view() if cfg.view_index is None else cfg.view_index
    if not 0 <= view < split.num_views:
        raise ValueError(f"view_index {view} outside the dataset's {split.num_views} views")
    position = {uid: i for i, uid in enumerate(reader.uids)}
    pools = group_pools(reader)
    groups = []
    for name in cfg.groups:
        scored, training = pools[name]
        ordered = sorted(scored, key=lambda u: (split_score(u), u))
        if name == "seen_view" and cfg.distinct_families:
            seen: set[str] = set()
            ordered = [u for u in ordered if not (shape_family(u) in seen or seen.add(shape_family(u)))]
        limit = cfg.group_max_objects.get(name, cfg.max_objects)
        chosen = ordered[:limit] if limit else ordered
        groups.append(EvalGroup(name, view, [position[u] for u in chosen], chosen,
                                view_seen_in_training=name == "seen_view" and split.holdout_view != view,
                                training_pool=training))
    if not any(g.indices for g in groups):
        raise ValueError(f"no objects to evaluate in groups {list(cfg.groups)} "
                         f"({len(split.train)} training / {len(split.val)} validation objects)")
    return groups


class EvalRows:
    """The stored rows evaluation needs, by dataset row and view."""

    def __init__(self, reader):
        self.reader = reader
        self._files: dict[Path, Any] = {}

    def get(self, index: int, view: int) -> dict[str, Any]:
        import pyarrow.parquet as pq

        from mar3d.data.schema import column_to_numpy, label_columns

        path, group = self.reader.index[index]
        if path not in self._files:
            self._files[path] = pq.ParquetFile(path)
        levels = [f"surface_{k}" for k in range(1, len(self.reader.surface_sizes))]
        tensors = _SHARD_COLUMNS[1:] + levels
        present = label_columns(self._files[path].schema_arrow, _RECORD_LABELS)  # older shards: none
        table = self._files[path].read_row_group(group, columns=["uid", *tensors, *present])
        row = {name: column_to_numpy(table.column(name))[0] for name in tensors}
        labels = {name: table.column(name)[0].as_py() for name in present}
        # np.array copies: slices of Arrow buffers are read-only, torch wants writable memory.
        return {"uid": table.column("uid")[0].as_py(), **{k: labels.get(k) for k in _RECORD_LABELS},
                "surface": row["surface_0"], "vol_points": row["vol_points"],
                "vol_labels": row["vol_labels"], "image": np.array(row["images"][view]),
                "world_to_cam": row["cam_world_to_cam"][view], "intrinsics": row["cam_intrinsics"][view],
                "surfaces": [row["surface_0"]] + [row[name] for name in levels]}


# ---------------------------------------------------------------------------- scoring
def _volume_iou(logits, labels) -> float:
    """Volume IoU of one object: all its points as one set."""
    return float(occupancy_iou(np.asarray(logits).reshape(-1), np.asarray(labels).reshape(-1)))


def _failed(record: dict[str, Any], reason: str) -> dict[str, Any]:
    record.update({k: v for k, v in FAILED_SCORES.items() if k in record})
    record["status"], record["error"] = "failed", reason
    return record


def strided(points: np.ndarray, count: int) -> np.ndarray:
    """An evenly strided, deterministic subset of at most ``count`` rows."""
    if len(points) <= count:
        return points
    return points[np.linspace(0, len(points) - 1, count).round().astype(int)]


def generate_batch(pipe: MAR3DPipeline, rows: list[dict[str, Any]], cfg: EvalConfig
                   ) -> list[dict[str, Any] | Exception]:
    """Generation outputs (``MAR3DPipeline.run`` dicts) of ``rows``' condition images,
    sampled as one batch with the same seed for every object (per-item generators: an
    object's shape does not depend on its batch mates). A batch that fails is retried
    object by object, so one bad object is its own failure, not its batch's."""
    try:
        return pipe.run([row["image"] for row in rows], seed=[cfg.seed] * len(rows))
    except Exception as e:  # noqa: BLE001 - retried per object below
        if len(rows) == 1:
            return [e]
    outs: list[dict[str, Any] | Exception] = []
    for row in rows:
        outs += generate_batch(pipe, [row], cfg)
    return outs


def evaluate_object(pipe: MAR3DPipeline, row: dict[str, Any], cfg: EvalConfig,
                    index: int = 0, out: dict[str, Any] | Exception | None = None
                    ) -> tuple[dict[str, Any], Any]:
    """Score one object's generated shape (``out``, from :func:`generate_batch`; None:
    generate it here); returns (per-object record, mesh or None)."""
    record: dict[str, Any] = {
        "index": index, "uid": row["uid"], **{k: row.get(k) for k in _RECORD_LABELS},
        "view": None, "level": "", "seconds": 0.0,
        "sample_seconds": 0.0, "decode_seconds": 0.0, "num_vertices": 0, "num_faces": 0,
        **{k: None for k in SCORE_KEYS}, "status": "ok", "error": ""}
    if not cfg.with_iou:
        record.pop("iou")
    t0 = time.perf_counter()
    out = generate_batch(pipe, [row], cfg)[0] if out is None else out
    if isinstance(out, Exception):
        record["seconds"] = time.perf_counter() - t0
        log.warning("object %s: generation failed: %s", row["uid"], out)
        return _failed(record, f"generation: {type(out).__name__}: {out}"), None
    mesh = out["mesh"]
    record.update(level=out["level"], seconds=out["sample_seconds"] + out["decode_seconds"],
                  sample_seconds=out["sample_seconds"], decode_seconds=out["decode_seconds"],
                  num_vertices=len(mesh.vertices), num_faces=len(mesh.faces))
    if len(mesh.faces) == 0:
        return _failed(record, "empty mesh: the decoded occupancy field has no surface "
                               "inside the extraction bounds"), mesh
    surface = np.asarray(row["surface"], np.float64)
    try:
        scores = mesh_metrics(mesh, (surface[:, :3], surface[:, 3:]), num_points=cfg.num_points,
                              threshold=cfg.fscore_threshold, normalize=True, seed=cfg.seed)
        if cfg.with_iou:
            logits = pipe.occupancy(out["tokens"], np.array(row["vol_points"], np.float32))
            scores["iou"] = _volume_iou(logits, row["vol_labels"])
    except ValueError as e:  # e.g. a degenerate ground truth: recorded, never skipped
        return _failed(record, f"metrics: {e}"), mesh
    bad = [k for k, v in scores.items() if not math.isfinite(v)]
    if bad:
        return _failed(record, f"non-finite metrics {bad}"), mesh
    record.update({k: float(scores[k]) for k in SCORE_KEYS if k in record})
    return record, mesh


def vae_reconstruction_iou(pipe: MAR3DPipeline, row: dict[str, Any]) -> float:
    """IoU of the VAE's reconstruction of the ground-truth surface (posterior mean at the
    pipeline's level), on the stored uniform points: what a perfect generator reaches."""
    import torch

    vae, level = pipe.vae, "hr" if pipe.uses_hr else "lr"
    sizes = pipe.vae_surface_sizes or [len(s) for s in row["surfaces"]]
    surfaces = [torch.from_numpy(np.ascontiguousarray(strided(s, n), np.float32)).unsqueeze(0).to(pipe.device)
                for s, n in zip(row["surfaces"][: vae.required_levels()], sizes)]
    with torch.no_grad():
        latents = vae.encode(surfaces, level=level, sample=False)
    logits = pipe.occupancy(latents, np.array(row["vol_points"], np.float32))
    return _volume_iou(logits, row["vol_labels"])


def aggregate(per_object: list[dict[str, Any]]) -> dict[str, float]:
    """Aggregate metrics under the failure rule of the module doc."""
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
    """[N, M] Chamfer distance (as :func:`mar3d.metrics.chamfer_distance`) of every
    prediction (points, or None for a failure: a row of +inf) to every ground truth.
    One KD-tree per point set, so N x M costs N x M queries, not N x M tree builds."""
    from scipy.spatial import cKDTree

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
    from scipy.spatial import cKDTree

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


# --------------------------------------------------------------------------- baseline
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


# ---------------------------------------------------------------------------- outputs
def _json_safe(value: Any) -> Any:
    """Strict JSON: non-finite floats become null (their meaning is in the doc)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_table(per_object: list[dict[str, Any]], path: Path) -> None:
    columns: list[str] = []
    for r in per_object:
        columns += [k for k in r if k not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(per_object)


def _preview(row: dict[str, Any], record: dict[str, Any], mesh, cfg: EvalConfig, path: Path) -> None:
    from PIL import Image

    from mar3d.preview import comparison_preview

    surface = np.asarray(row["surface"], np.float64)
    if record["status"] == "ok":
        caption = (f"{record['uid']}  CD {record['chamfer']:.4f}  F {record['f_score']:.3f}  "
                   f"NC {record['normal_consistency']:.3f}")
    else:
        caption = f"{record['uid']}  FAILED: {record['error'][:60]}"
    image = comparison_preview(row["image"], mesh, surface[:, :3], surface[:, 3:],
                               row["world_to_cam"], row["intrinsics"],
                               image_resolution=row["image"].shape[1],
                               resolution=cfg.preview_resolution, caption=caption)
    Image.fromarray(image).save(path)


def _sheet_caption(record: dict[str, Any], nearest: str | None) -> str:
    name = record["uid"][17:] if re.match(r"^[0-9a-f]{16}-", record["uid"]) else record["uid"]
    if record["status"] != "ok":
        return f"{name}: FAILED {record['error'][:70]}"
    mark = "own GT nearest" if nearest == record["uid"] else f"nearest GT: {(nearest or '-')[17:]}"
    return f"{name}  CD {record['chamfer']:.3f}  F {record['f_score']:.2f}  ({mark})"


def _check_release_matches(model: str, release, tracking_uri: str) -> None:
    """Metrics of one model must not be attached to another release."""
    from mar3d.registry import get_release

    if model.startswith("models:/"):
        evaluated = get_release(model, tracking_uri)
        if (evaluated.name, evaluated.version) != (release.name, release.version):
            raise ValueError(f"model {model} is release {evaluated.uri}, not {release.uri}: "
                             "refusing to record its metrics on another release")


def protocol_fingerprint(group: EvalGroup, dataset_hash: str, cfg: EvalConfig) -> str:
    """Identity of "the same objects, scored the same way": two evaluations with equal
    fingerprints are comparable metric by metric (the promotion gate relies on it)."""
    doc = {"dataset": dataset_hash, "group": group.name, "uids": group.uids, "view": group.view,
           "generate": to_dict(cfg.generate), "seed": cfg.seed, "num_points": cfg.num_points,
           "threshold": cfg.fscore_threshold}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------- main
@dataclass
class _Scored:
    records: list[dict[str, Any]]
    meshes: list[Any]
    points: list[np.ndarray | None]


def _score_group(pipe: MAR3DPipeline, group: EvalGroup, group_rows: list[dict[str, Any]],
                 cfg: EvalConfig, bar, label: str) -> _Scored:
    from mar3d.metrics import sample_surface

    records, meshes, points = [], [], []
    outs: list[Any] = []
    for i, row in enumerate(group_rows):
        if i % cfg.batch_size == 0:
            outs = generate_batch(pipe, group_rows[i:i + cfg.batch_size], cfg)
        record, mesh = evaluate_object(pipe, row, cfg, index=i, out=outs[i % cfg.batch_size])
        record.update(group=group.name, view=group.view, model=label)
        if cfg.with_vae_iou:
            record["vae_iou"] = vae_reconstruction_iou(pipe, row)
        ok = record["status"] == "ok"
        points.append(sample_surface(mesh, cfg.retrieval_points, seed=cfg.seed)[0] if ok else None)
        records.append(record)
        meshes.append(mesh if ok else None)
        bar.update(1)
        bar.set_postfix(group=group.name, model=label,
                        failed=sum(r["status"] != "ok" for r in records))
    return _Scored(records, meshes, points)


def evaluate(model: str, dataset: str | Path, output: str | Path, cfg: EvalConfig | None = None,
             tracking_uri: str | None = None, release_uri: str | None = None,
             progress: bool = True, extra_params: dict[str, Any] | None = None,
             compare_to: str | None = None) -> EvalResult:
    """Evaluate ``model`` (a release URI or a folder with vae/ lr/ [hr/]) on the prepared
    dataset at ``dataset``; see the module doc for groups, protocol and outputs.
    ``compare_to`` (e.g. ``models:/mar3d@champion``) is scored on the same objects too.
    ``extra_params`` are logged as MLflow params next to the config."""
    from mar3d import tracking
    from mar3d.data.dataset import ShapeDataset
    from mar3d.registry import get_release

    cfg = cfg or EvalConfig()
    cfg.validate()
    # Bad locations fail here, before any model is loaded.
    storage.check(dataset, "evaluation dataset", must_exist=True)
    storage.check(output, "evaluation output")
    if storage.is_remote(output):
        return _evaluate_to_remote(model, dataset, str(output), cfg, tracking_uri, release_uri,
                                   progress, extra_params, compare_to)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    tracking_uri = tracking_uri or tracking.default_tracking_uri(output)
    tracking.check_reachable(tracking_uri)

    # Everything that can fail for reasons other than the model fails before the run.
    fingerprint = dataset_fingerprint(dataset)
    reader = ShapeDataset(dataset, num_occ=1, near_fraction=0.0, with_image=False, cache_rows=0)
    if len(reader) == 0:
        raise ValueError(f"{dataset} has no complete shard rows to evaluate")
    groups = select_groups(reader, cfg)
    release = get_release(release_uri, tracking_uri) if release_uri else None
    if release is not None:
        _check_release_matches(model, release, tracking_uri)
    champion = get_release(compare_to, tracking_uri) if compare_to else None
    ctx = _GroupScoring(
        cfg=cfg, output=output, rows=EvalRows(reader), up_axis=reader.up_axis,
        dataset_hash=fingerprint["hash"],
        pipe=MAR3DPipeline.from_pretrained(model, config=copy.deepcopy(cfg.generate), device=cfg.device,
                                           tracking_uri=tracking_uri),
        champion=champion,
        champion_pipe=(MAR3DPipeline.from_pretrained(champion.uri, config=copy.deepcopy(cfg.generate),
                                                     device=cfg.device, tracking_uri=tracking_uri)
                       if champion else None),
        baselines=_group_baselines(reader, cfg, groups))

    with tracking.tracked_run(
            tracking_uri, cfg.experiment, cfg.run_name or f"eval-{Path(_dataset_path(dataset)).name}",
            tags={"mar3d.kind": "eval", "mar3d.model": model,
                  **({"mar3d.release": release.uri} if release else {}),
                  **({"mar3d.champion": champion.uri} if champion else {})}) as run:
        run_id = run.run_id
        params = _run_params(model, dataset, fingerprint, cfg, ctx, groups, extra_params)
        tracking.log_params(tracking_uri, run_id, params)

        for folder in (PREVIEW_DIR, SHEET_DIR):
            (output / folder).mkdir(exist_ok=True)
        total = sum(len(g.indices) for g in groups) * (2 if ctx.champion_pipe else 1)
        ctx.bar = progress_bar(total, "evaluate", "object", enabled=progress)
        outcomes = [_evaluate_group(ctx, group, dataset) for group in groups]
        ctx.bar.close()
        per_object = [r for o in outcomes for r in o.records]
        metrics = {k: v for o in outcomes for k, v in o.metrics.items()}
        tags = {k: v for o in outcomes for k, v in o.tags.items()}
        sheets = {o.name: o.sheet for o in outcomes if o.sheet is not None}
        failed = [r for r in per_object if r["status"] != "ok"]
        report = {"model": model, "dataset": _dataset_path(dataset), "dataset_fingerprint": fingerprint,
                  "config": to_dict(cfg), "run_id": run_id, "tracking_uri": tracking_uri,
                  "release": release.uri if release else None, **_report_results(ctx, outcomes)}
        report_path = output / REPORT_FILE
        storage.write_bytes(report_path, (json.dumps(_json_safe(report), indent=2) + "\n").encode())
        write_table(per_object + report["champion_per_object"], output / TABLE_FILE)
        _log_evaluation(tracking_uri, run_id, output, metrics, per_object, release, tags)
    if failed:
        log.warning("%d of %d objects failed: %s", len(failed), len(per_object),
                    "; ".join(f"{r['uid']}: {r['error']}" for r in failed[:5]))
    return EvalResult(metrics=metrics, per_object=per_object, report_path=report_path, run_id=run_id,
                      failed=failed, tracking_uri=tracking_uri, contact_sheets=sheets)


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


def _run_params(model: str, dataset, fingerprint: dict, cfg: EvalConfig, ctx: "_GroupScoring",
                groups, extra_params: dict[str, Any] | None) -> dict[str, Any]:
    """The evaluation run's MLflow params: config, model, dataset identity, groups."""
    params = {f"eval.{k}": v for k, v in flatten(cfg).items()}
    params.update({"model": model, "dataset.path": _dataset_path(dataset),
                   "dataset.hash": fingerprint["hash"], "dataset.rows": fingerprint["rows"],
                   "pipeline.level": "hr" if ctx.pipe.uses_hr else "lr", "device": str(ctx.pipe.device),
                   "compare_to": ctx.champion.uri if ctx.champion else "",
                   **{f"group.{name}.baseline_uid": shape.uid for name, shape in ctx.baselines.items()},
                   **{f"group.{g.name}.objects": len(g.indices) for g in groups},
                   **(extra_params or {})})
    return params


def _report_results(ctx: "_GroupScoring", outcomes: list["_GroupOutcome"]) -> dict[str, Any]:
    """The results part of report.json: groups, metrics, per-object rows, contact sheets."""
    return {"champion": ctx.champion.uri if ctx.champion else None,
            "baselines": {name: {"uid": shape.uid, "pool": shape.pool,
                                 "mean_chamfer_to_pool": shape.mean_chamfer}
                          for name, shape in ctx.baselines.items()},
            "groups": {o.name: o.doc for o in outcomes},
            "metrics": {k: v for o in outcomes for k, v in o.metrics.items()},
            "per_object": [r for o in outcomes for r in o.records],
            "champion_per_object": [r for o in outcomes for r in o.champion_records],
            "contact_sheets": {o.name: str(o.sheet.relative_to(ctx.output)) for o in outcomes
                               if o.sheet is not None},
            "protocol": ("canonical frame, no alignment; per-object scores normalized by the GT "
                         "bounding box (mar3d.metrics), Chamfer matrices in the dataset frame; "
                         "failed objects count 0 in f_score/normal_consistency/iou/precision/"
                         "recall means and as retrieval misses, and are excluded from the "
                         "chamfer mean")}


@dataclass
class _GroupScoring:
    """What scoring one evaluation group needs (shared by all groups of a run)."""
    cfg: EvalConfig
    output: Path
    rows: "EvalRows"
    up_axis: str
    dataset_hash: str
    pipe: MAR3DPipeline
    champion: Any = None                      # the champion release, when compared
    champion_pipe: MAR3DPipeline | None = None
    baselines: dict[str, Any] = field(default_factory=dict)  # group -> its mean shape (when enabled)
    bar: Any = None                           # progress bar over all groups


@dataclass
class _GroupOutcome:
    name: str
    doc: dict[str, Any]                       # the group's section of report.json
    records: list[dict[str, Any]] = field(default_factory=list)
    champion_records: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    sheet: Path | None = None


def _evaluate_group(ctx: _GroupScoring, group, dataset) -> _GroupOutcome:
    """Score one group: the candidate (and the champion, the baseline) against its
    ground truths, with retrieval, previews and its contact sheet."""
    cfg, output = ctx.cfg, ctx.output
    doc: dict[str, Any] = {"description": GROUP_DESCRIPTIONS[group.name], "view": group.view,
                           "view_seen_in_training": group.view_seen_in_training, "objects": group.uids}
    outcome = _GroupOutcome(group.name, doc)
    if not group.indices:
        log.warning("evaluation group %s has no objects in %s", group.name, dataset)
        doc["candidate"] = None
        return outcome
    doc["protocol"] = protocol_fingerprint(group, ctx.dataset_hash, cfg)
    outcome.tags[f"eval.{group.name}.protocol"] = doc["protocol"]
    group_rows = [ctx.rows.get(i, group.view) for i in group.indices]
    truths = [strided(np.asarray(r["surface"], np.float64)[:, :3], cfg.retrieval_points)
              for r in group_rows]
    scored = _score_group(ctx.pipe, group, group_rows, cfg, ctx.bar, "candidate")
    matrix = cross_chamfer(scored.points, truths)
    categories = [r.get("category") for r in group_rows]
    # The ground truths' spread is the same for every model scored on the group.
    truth_pairs = pairwise_chamfer(truths)
    candidate = {**aggregate(scored.records),
                 **following_metrics(matrix, scored.points, truths, truth_pairs),
                 **category_following(matrix, categories)}
    nearest = [group.uids[int(np.argmin(r))] if np.isfinite(r).any() else None for r in matrix]
    for record, near in zip(scored.records, nearest):
        record["nearest_gt"] = near
        record["retrieved"] = near == record["uid"]
    doc["candidate"] = candidate
    outcome.records = scored.records
    _write_matrix(output / f"chamfer_{group.name}.csv", group.uids, matrix)

    baseline = ctx.baselines.get(group.name)
    if baseline is not None:
        base_rows = [baseline_record(baseline, r, cfg) for r in group_rows]
        constant = [strided(baseline.points, cfg.retrieval_points)] * len(truths)
        base_matrix = cross_chamfer(constant, truths)
        doc["baseline"] = {"uid": baseline.uid, "pool": baseline.pool,
                           **aggregate(base_rows),
                           **following_metrics(base_matrix, constant, truths, truth_pairs),
                           **category_following(base_matrix, categories)}
        doc["baseline"].pop("seconds_per_object", None)
    if "category_accuracy" in candidate:
        by_model = {"": (matrix, scored.records)}
        if baseline is not None:
            by_model["baseline_"] = (base_matrix, base_rows)
        doc["per_category"] = per_category(categories, by_model)
        _write_rows(output / f"per_category_{group.name}.csv", doc["per_category"])
    if ctx.champion_pipe is not None:
        champ = _score_group(ctx.champion_pipe, group, group_rows, cfg, ctx.bar, "champion")
        champ_matrix = cross_chamfer(champ.points, truths)
        doc["champion"] = {"release": ctx.champion.uri, **aggregate(champ.records),
                           **following_metrics(champ_matrix, champ.points, truths, truth_pairs)}
        outcome.champion_records = champ.records
        outcome.tags[f"eval.{group.name}.champion"] = ctx.champion.uri

    for prefix, values in (("", candidate), ("baseline/", doc.get("baseline")),
                           ("champion/", doc.get("champion"))):
        for k, v in (values or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                outcome.metrics[f"{group.name}/{prefix}{k}"] = float(v)

    for i, (row, record, mesh) in enumerate(zip(group_rows, scored.records, scored.meshes)):
        if i < cfg.previews:
            name = f"{group.name}_{i:04d}_{storage.safe_name(record['uid'])}.png"
            _preview(row, record, mesh, cfg, output / PREVIEW_DIR / name)
            record["preview"] = f"{PREVIEW_DIR}/{name}"
    if cfg.contact_sheet:
        outcome.sheet = _group_contact_sheet(ctx, group, group_rows, scored, nearest, candidate,
                                             doc.get("baseline") or {})
    return outcome


def _group_contact_sheet(ctx: _GroupScoring, group, group_rows, scored, nearest, candidate: dict,
                         baseline: dict) -> Path:
    """Condition image | generated mesh | ground truth per object, with the group's scores."""
    from PIL import Image

    from mar3d.preview import contact_sheet, contact_sheet_row

    sheet_rows = []
    for row, record, mesh, near in zip(group_rows, scored.records, scored.meshes, nearest):
        surface = np.asarray(row["surface"], np.float64)
        sheet_rows.append(contact_sheet_row(
            row["image"], mesh, (surface[:, :3], surface[:, 3:]), row["world_to_cam"],
            row["intrinsics"], ctx.up_axis, ctx.cfg.contact_sheet_resolution,
            caption=_sheet_caption(record, near)))
    title = (f"{group.name} ({GROUP_DESCRIPTIONS[group.name]}), view {group.view}: "
             f"F {candidate['f_score']:.3f} vs mean-shape {baseline.get('f_score', float('nan')):.3f}, "
             f"retrieval {int(candidate['retrieval_hits'])}/{len(group.indices)}, "
             f"diversity {candidate['diversity_ratio'] or 0:.2f}"
             + (f", category accuracy {candidate['category_accuracy']:.2f}"
                if "category_accuracy" in candidate else ""))
    path = ctx.output / SHEET_DIR / f"{group.name}.png"
    Image.fromarray(contact_sheet(sheet_rows, title=title, columns=2)).save(path)
    return path


def _log_evaluation(tracking_uri: str, run_id: str, output: Path, metrics: dict[str, float],
                    per_object: list[dict[str, Any]], release, tags: dict[str, str]) -> None:
    """Metrics, the per-object table, report, matrices, previews and contact sheets to the
    MLflow run; the metrics also to the release when one is evaluated (the gate's input)."""
    from mar3d import tracking
    from mar3d.registry import record_metrics

    finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
    # MLflow stores +inf as the largest float; a tag says what it means instead.
    tracking.log_metrics(tracking_uri, run_id, finite, step=0,
                         tags={f"nonfinite.{k}": v for k, v in metrics.items() if k not in finite})
    client = tracking.client(tracking_uri)
    if per_object:
        columns = list(dict.fromkeys(k for r in per_object for k in r))
        client.log_table(run_id, data={k: [_json_safe(r.get(k)) for r in per_object] for k in columns},
                         artifact_file="per_object_table.json")
    for path in [output / REPORT_FILE, output / TABLE_FILE, *output.glob("chamfer_*.csv"),
                 *output.glob("per_category_*.csv")]:
        client.log_artifact(run_id, str(path))
    for folder in (PREVIEW_DIR, SHEET_DIR):
        if any((output / folder).iterdir()):
            client.log_artifacts(run_id, str(output / folder), folder)
    if release is not None:
        record_metrics(release, metrics, run_id, tracking_uri=tracking_uri, tags=tags)


def _dataset_path(dataset: str | Path) -> str:
    return str(dataset) if storage.is_remote(dataset) else str(Path(dataset).resolve())


def _evaluate_to_remote(model, dataset, output: str, cfg, tracking_uri, release_uri, progress,
                        extra_params, compare_to) -> EvalResult:
    """:func:`evaluate` into a local staging folder, then every output file uploaded to
    ``output`` (object storage); the result names the uploaded files. The evaluation
    writes many small files and logs them to MLflow from local paths, so staging keeps
    one code path; nothing is uploaded when it fails (the MLflow run says FAILED)."""
    from mar3d import tracking

    staging = storage.local_staging(output)
    try:
        result = evaluate(model, dataset, staging, cfg,
                          tracking_uri=tracking_uri or tracking.default_tracking_uri(output),
                          release_uri=release_uri, progress=progress, extra_params=extra_params,
                          compare_to=compare_to)
        storage.upload_dir(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result.report_path = storage.join(output, REPORT_FILE)
    result.contact_sheets = {g: storage.join(output, Path(p).relative_to(staging).as_posix())
                             for g, p in result.contact_sheets.items()}
    return result


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _write_matrix(path: Path, uids: list[str], matrix: np.ndarray) -> None:
    """Rows: generated mesh of each object; columns: ground truths; +inf for a failure."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["generated \\ ground truth", *uids])
        for uid, row in zip(uids, matrix):
            writer.writerow([uid, *(f"{v:.6f}" if math.isfinite(v) else "inf" for v in row)])


TABLE_METRICS = (("f_score", "F-score@{t} ↑"), ("chamfer", "Chamfer ↓"), ("normal_consistency", "normal cons. ↑"),
                 ("iou", "volume IoU ↑"), ("retrieval_top1", "top-1 retrieval ↑"),
                 ("category_accuracy", "category accuracy ↑"),
                 ("diversity_ratio", "diversity ratio"), ("vae_iou", "VAE recon. IoU (ceiling)"))


def evaluation_table(result: EvalResult | dict[str, float], threshold: float = DEFAULT_THRESHOLD) -> str:
    """Markdown table of every group: candidate next to its baseline (and champion)."""
    metrics = result.metrics if isinstance(result, EvalResult) else result
    groups = [g for g in GROUPS if f"{g}/num_objects" in metrics]
    lines = []
    for group in groups:
        n = int(metrics[f"{group}/num_objects"])
        columns = [("candidate", ""), ("mean-shape baseline", "baseline/"), ("champion", "champion/")]
        columns = [(name, p) for name, p in columns if f"{group}/{p}num_objects" in metrics]
        lines += [f"{group} ({GROUP_DESCRIPTIONS[group]}, {n} objects, chance retrieval 1/{n})",
                  "| metric | " + " | ".join(name for name, _ in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for key, label in TABLE_METRICS:
            values = [metrics.get(f"{group}/{p}{key}") for _, p in columns]
            if all(v is None for v in values):
                continue
            cells = ["-" if v is None else (f"{int(metrics[f'{group}/{p}retrieval_hits'])}/{n}"
                                            if key == "retrieval_top1" else f"{v:.4f}")
                     for v, (_, p) in zip(values, columns)]
            lines.append(f"| {label.format(t=threshold)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip()


def evaluate_components(vae_uri: str, lr_uri: str, hr_uri: str | None, dataset: str | Path,
                        output: str | Path, cfg: EvalConfig | None = None,
                        tracking_uri: str | None = None, progress: bool = True,
                        compare_to: str | None = None) -> EvalResult:
    """:func:`evaluate` for three separately given components (no registered release)."""
    from mar3d.tracking import default_tracking_uri

    cfg = cfg or EvalConfig()
    if hr_uri is None and cfg.generate.use_hr:
        raise ValueError("no MAR-HR model given: pass hr_uri or set generate.use_hr=false")
    tracking_uri = tracking_uri or default_tracking_uri(output)
    components = {"model.vae": vae_uri, "model.lr": lr_uri, "model.hr": hr_uri or ""}
    with tempfile.TemporaryDirectory(prefix="mar3d-eval-release-") as tmp:
        release_dir = assemble_release_dir(vae_uri, lr_uri, hr_uri, tmp, tracking_uri=tracking_uri)
        return evaluate(str(release_dir), dataset, output, cfg, tracking_uri=tracking_uri,
                        progress=progress, extra_params=components, compare_to=compare_to)


__all__ = ["EvalConfig", "EvalGroup", "EvalResult", "GROUPS", "aggregate", "assemble_release_dir",
           "cross_chamfer", "pairwise_chamfer", "dataset_fingerprint", "evaluate", "evaluate_components",
           "evaluate_object", "evaluation_table", "generate_batch", "following_metrics", "mean_shape",
           "select_groups"]
