"""Generating and scoring one model's shapes, object by object: batched sampling with a
per-object fallback, per-object metrics under the failure rule, the VAE's ceiling."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mar3d.evaluate.config import _RECORD_LABELS, FAILED_SCORES, SCORE_KEYS, EvalConfig
from mar3d.evaluate.groups import EvalGroup, EvalRows
from mar3d.inference import MAR3DPipeline, MAR3DPipelineOutput
from mar3d.metrics import mesh_metrics
from mar3d.models.vae import occupancy_iou

log = logging.getLogger(__name__)


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


def pipeline_outputs(pipe: MAR3DPipeline, rows: list[dict[str, Any]], cfg: EvalConfig
                   ) -> list[MAR3DPipelineOutput | Exception]:
    """Pipeline outputs, one per row, of ``rows``' condition images,
    sampled as one batch with the same seed for every object (per-item generators: an
    object's shape does not depend on its batch mates). A batch that fails is retried
    object by object, so one bad object is its own failure, not its batch's."""
    try:
        return pipe([row["image"] for row in rows], seed=[cfg.seed] * len(rows)).split()
    except Exception as e:  # noqa: BLE001 - retried per object below
        if len(rows) == 1:
            return [e]
    outs: list[MAR3DPipelineOutput | Exception] = []
    for row in rows:
        outs += pipeline_outputs(pipe, [row], cfg)
    return outs


def evaluate_object(pipe: MAR3DPipeline, row: dict[str, Any], cfg: EvalConfig,
                    index: int = 0, out: MAR3DPipelineOutput | Exception | None = None
                    ) -> tuple[dict[str, Any], Any]:
    """Score one object's generated shape (``out``, from :func:`pipeline_outputs`; None:
    generate it here); returns (per-object record, mesh or None)."""
    record: dict[str, Any] = {
        "index": index, "uid": row["uid"], **{k: row.get(k) for k in _RECORD_LABELS},
        "view": None, "level": "", "seconds": 0.0,
        "sample_seconds": 0.0, "decode_seconds": 0.0, "num_vertices": 0, "num_faces": 0,
        **{k: None for k in SCORE_KEYS}, "status": "ok", "error": ""}
    if not cfg.with_iou:
        record.pop("iou")
    t0 = time.perf_counter()
    out = pipeline_outputs(pipe, [row], cfg)[0] if out is None else out
    if isinstance(out, Exception):
        record["seconds"] = time.perf_counter() - t0
        log.warning("object %s: generation failed: %s", row["uid"], out)
        return _failed(record, f"generation: {type(out).__name__}: {out}"), None
    mesh, decode_seconds = out.meshes[0], out.decode_seconds[0]
    record.update(level=out.level, seconds=out.sample_seconds + decode_seconds,
                  sample_seconds=out.sample_seconds, decode_seconds=decode_seconds,
                  num_vertices=len(mesh.vertices), num_faces=len(mesh.faces))
    if len(mesh.faces) == 0:
        return _failed(record, "empty mesh: the decoded occupancy field has no surface "
                               "inside the extraction bounds"), mesh
    surface = np.asarray(row["surface"], np.float64)
    try:
        scores = mesh_metrics(mesh, (surface[:, :3], surface[:, 3:]), num_points=cfg.num_points,
                              threshold=cfg.fscore_threshold, normalize=True, seed=cfg.seed)
        if cfg.with_iou:
            logits = pipe.occupancy(out.latents, np.array(row["vol_points"], np.float32))
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

    vae, level = pipe.vae, pipe.output_level
    sizes = pipe.vae_surface_sizes or [len(s) for s in row["surfaces"]]
    surfaces = [torch.from_numpy(np.ascontiguousarray(strided(s, n), np.float32)).unsqueeze(0).to(pipe.device)
                for s, n in zip(row["surfaces"][: vae.required_levels()], sizes)]
    with torch.no_grad():
        latents = vae.encode(surfaces, level=level, sample=False)
    logits = pipe.occupancy(latents, np.array(row["vol_points"], np.float32))
    return _volume_iou(logits, row["vol_labels"])


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
            outs = pipeline_outputs(pipe, group_rows[i:i + cfg.batch_size], cfg)
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


@dataclass
class _GroupScoring:
    """What scoring one evaluation group needs (shared by all groups of a run)."""
    cfg: EvalConfig
    output: Path
    rows: "EvalRows"
    up_axis: str
    dataset_hash: str
    pipe: MAR3DPipeline
    model: str = ""                           # what is evaluated (for captions)
    champion: Any = None                      # the champion release, when compared
    champion_pipe: MAR3DPipeline | None = None
    baselines: dict[str, Any] = field(default_factory=dict)  # group -> its mean shape (when enabled)
    bar: Any = None                           # progress bar over all groups
