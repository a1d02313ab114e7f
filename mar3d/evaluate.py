"""Evaluation of generated shapes against held-out ground truth, logged to MLflow.

    result = evaluate("models:/mar3d@candidate", "data/heldout", "out/eval", EvalConfig())

For every object of a prepared dataset (``mar3d data prepare`` shards), the condition
image of view ``view_index`` goes through :class:`~mar3d.inference.MAR3DPipeline`; the
generated mesh is scored against the object's stored ground truth.

Protocol:

* **Frame, no alignment search.** The models are trained on the dataset's canonical
  frame (every mesh centred and scaled into [-1, 1]^3, never rotated to the view), so a
  generated shape lives in the same frame as its ground truth and is compared as is.
  Both are then normalized by the ground truth's bounding box, as
  :func:`mar3d.metrics.mesh_metrics` documents (centre at 0, longest side 2).
* **Ground truth** is the stored ``surface_0`` points and normals (sampled from the
  watertight mesh the VAE learned from), used as they are; ``num_points`` points are
  sampled from the generated mesh. Chamfer distance (unsquared, mean of both
  directions), F-score at ``fscore_threshold`` and normal consistency follow
  :mod:`mar3d.metrics`.
* **IoU** is measured on the stored uniform ``vol_points`` / ``vol_labels``: the
  decoder's occupancy of the generated latents (logit > 0) against the labels. It
  needs no inside test on the extracted mesh and is exact for the field the mesh is
  extracted from.
* **Failures** are results. An object whose generation raises, whose mesh is empty or
  whose metrics are not finite is recorded with ``status="failed"`` and the reason in
  ``error``; its row holds F-score = normal consistency = IoU = precision = recall = 0
  and no chamfer distance. Aggregates: ``f_score``, ``normal_consistency``, ``iou``,
  ``precision`` and ``recall`` are means over *all* objects (failures count as 0, so
  failing on hard objects cannot improve a score); ``chamfer`` is the mean over the
  ``num_scored`` successful objects only (a failure has no finite distance), +inf when
  none succeeded. ``num_objects``, ``num_scored``, ``num_failed`` and ``failure_rate``
  are always reported next to them.

Results go to ``output/`` (``report.json``, ``per_object.csv``, ``previews/*.png``) and
to one MLflow run in ``cfg.experiment``: params (flattened config, model URI, dataset
path and content hash), the aggregate metrics, the per-object table (``log_table``, so
the MLflow UI shows it, plus the CSV), previews (input | generated | ground-truth
normal maps from the input's camera, see :mod:`mar3d.preview`) and the report. With
``release_uri`` the aggregates are also attached to that registry release, where the
promotion gate reads them.
"""
from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
import math
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mar3d.config import flatten, to_dict
from mar3d.inference import GenerateConfig, MAR3DPipeline
from mar3d.metrics import DEFAULT_THRESHOLD, mesh_metrics

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"
TABLE_FILE = "per_object.csv"
PREVIEW_DIR = "previews"
SCORE_KEYS = ("chamfer", "f_score", "precision", "recall", "normal_consistency", "iou")
# Failed objects enter the all-object means with these values (see the module doc).
FAILED_SCORES = {"chamfer": None, "f_score": 0.0, "precision": 0.0, "recall": 0.0,
                 "normal_consistency": 0.0, "iou": 0.0}
_SHARD_COLUMNS = ["uid", "surface_0", "vol_points", "vol_labels", "images",
                  "cam_world_to_cam", "cam_intrinsics"]


@dataclass
class EvalConfig:
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    view_index: int = 0                  # which stored condition view is the input image
    max_objects: int | None = None       # first N objects in dataset order; None = all
    seed: int = 0                        # sampling seed, the same for every object
    num_points: int = 50_000             # points sampled from each generated mesh
    fscore_threshold: float = DEFAULT_THRESHOLD
    with_iou: bool = True
    previews: int = 8                    # preview images for the first N objects
    preview_resolution: int = 256
    experiment: str = "mar3d-eval"
    run_name: str = ""                   # "" = "eval-<dataset folder name>"
    device: str = "auto"                 # "auto" | "cpu" | "cuda" | "cuda:N"

    def validate(self) -> None:
        self.generate.validate()
        if self.view_index < 0:
            raise ValueError(f"view_index must be >= 0, got {self.view_index}")
        if self.max_objects is not None and self.max_objects < 1:
            raise ValueError(f"max_objects must be >= 1 or null, got {self.max_objects}")
        if self.num_points < 1:
            raise ValueError(f"num_points must be >= 1, got {self.num_points}")
        if not (math.isfinite(self.fscore_threshold) and self.fscore_threshold > 0):
            raise ValueError(f"fscore_threshold must be > 0, got {self.fscore_threshold}")
        if self.previews < 0:
            raise ValueError(f"previews must be >= 0, got {self.previews}")
        if not 32 <= self.preview_resolution <= 2048:
            raise ValueError(f"preview_resolution must be in [32, 2048], got {self.preview_resolution}")
        if not self.experiment:
            raise ValueError("experiment must be a non-empty MLflow experiment name")
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass
class EvalResult:
    metrics: dict[str, float]
    per_object: list[dict[str, Any]]
    report_path: Path
    run_id: str
    failed: list[dict[str, Any]]  # the per-object rows with status "failed"
    tracking_uri: str = ""


# ------------------------------------------------------------------------------ models
def assemble_release_dir(vae_uri: str, lr_uri: str, hr_uri: str | None, dest: str | Path,
                         tracking_uri: str | None = None) -> Path:
    """One release folder (``dest/vae``, ``dest/lr``, ``dest/hr``) from three separately
    given components (local folders or ``runs:/`` / ``models:/`` URIs), so that evaluating
    components that were never registered as a release goes through the same loading
    path as a release. Remote components are downloaded under ``dest/.download``; every
    component becomes a symlink to its folder (nothing is copied)."""
    from mar3d.weights import resolve_model_dir

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for component, uri in (("vae", vae_uri), ("lr", lr_uri), ("hr", hr_uri)):
        link = dest / component
        if link.is_symlink() or link.exists():
            raise FileExistsError(f"{link} already exists; give an empty destination folder")
        if uri is None:
            continue
        if Path(uri).is_dir():
            folder = Path(uri)
        else:
            download = dest / ".download" / component
            download.mkdir(parents=True)
            folder = resolve_model_dir(uri, tracking_uri=tracking_uri, dst=download)
        link.symlink_to(Path(folder).resolve(), target_is_directory=True)
    return dest


# ----------------------------------------------------------------------------- dataset
def dataset_fingerprint(root: str | Path) -> dict[str, Any]:
    """Content identity of a prepared dataset: sha256 over its complete shards' hashes
    (the manifest's timestamps change on every re-run, the shard contents do not)."""
    from mar3d.data.prepare import complete_shards, load_manifest

    manifest = load_manifest(root)
    if manifest is None:
        raise FileNotFoundError(f"{root} has no manifest.json: run `mar3d data prepare` first")
    shards = complete_shards(root, manifest, verify=False)
    listing = sorted((s["file"], s["sha256"], int(s["rows"])) for s in shards)
    digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    return {"hash": digest, "rows": sum(r for _, _, r in listing), "shards": len(listing),
            "schema_version": manifest.get("schema_version")}


class EvalRows:
    """The stored rows of a prepared dataset that evaluation needs, in dataset order."""

    def __init__(self, root: str | Path, view_index: int, max_objects: int | None = None):
        from mar3d.data.dataset import ShapeDataset

        # ShapeDataset validates the manifest, the shards and the view index and gives
        # the row order; its random sub-sampling is not used (num_occ is a placeholder).
        reader = ShapeDataset(root, num_occ=1, near_fraction=0.0, view_index=view_index)
        if len(reader) == 0:
            raise ValueError(f"{root} has no complete shard rows to evaluate")
        self.index = reader.index[:max_objects] if max_objects else reader.index
        self.view_index = view_index
        self._files: dict[Path, Any] = {}

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import pyarrow.parquet as pq

        from mar3d.data.schema import column_to_numpy

        path, group = self.index[i]
        if path not in self._files:
            self._files[path] = pq.ParquetFile(path)
        table = self._files[path].read_row_group(group, columns=_SHARD_COLUMNS)
        row = {"uid": table.column("uid")[0].as_py()}
        for name in _SHARD_COLUMNS[1:]:
            row[name] = column_to_numpy(table.column(name))[0]
        v = self.view_index
        # np.array copies: slices of Arrow buffers are read-only, torch wants writable memory.
        return {"uid": row["uid"], "surface": row["surface_0"], "vol_points": row["vol_points"],
                "vol_labels": row["vol_labels"], "image": np.array(row["images"][v]),
                "world_to_cam": row["cam_world_to_cam"][v], "intrinsics": row["cam_intrinsics"][v]}


# ---------------------------------------------------------------------------- scoring
def occupancy_iou(logits: np.ndarray, labels: np.ndarray) -> float:
    """IoU of the inside sets (logit > 0 vs label 1); 1.0 when both are empty."""
    pred = np.asarray(logits).reshape(-1) > 0
    gt = np.asarray(labels).reshape(-1).astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(f"{pred.shape[0]} occupancy logits for {gt.shape[0]} labels")
    union = (pred | gt).sum()
    return 1.0 if union == 0 else float((pred & gt).sum() / union)


def _failed(record: dict[str, Any], reason: str) -> dict[str, Any]:
    record.update({k: v for k, v in FAILED_SCORES.items() if k in record})
    record["status"], record["error"] = "failed", reason
    return record


def evaluate_object(pipe: MAR3DPipeline, row: dict[str, Any], cfg: EvalConfig,
                    index: int = 0) -> tuple[dict[str, Any], Any]:
    """Generate and score one object; returns (per-object record, mesh or None)."""
    record: dict[str, Any] = {
        "index": index, "uid": row["uid"], "view": cfg.view_index, "level": "", "seconds": 0.0,
        "sample_seconds": 0.0, "decode_seconds": 0.0, "num_vertices": 0, "num_faces": 0,
        **{k: None for k in SCORE_KEYS}, "status": "ok", "error": ""}
    if not cfg.with_iou:
        record.pop("iou")
    t0 = time.perf_counter()
    try:
        out = pipe.run(row["image"], seed=cfg.seed)
    except Exception as e:  # noqa: BLE001 - one object's failure is a result, not a crash
        record["seconds"] = time.perf_counter() - t0
        log.warning("object %s: generation failed: %s", row["uid"], e)
        return _failed(record, f"generation: {type(e).__name__}: {e}"), None
    mesh = out["mesh"]
    record.update(level=out["level"], seconds=time.perf_counter() - t0,
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
            scores["iou"] = occupancy_iou(np.asarray(logits), row["vol_labels"])
    except ValueError as e:  # e.g. a degenerate ground truth: recorded, never skipped
        return _failed(record, f"metrics: {e}"), mesh
    bad = [k for k, v in scores.items() if not math.isfinite(v)]
    if bad:
        return _failed(record, f"non-finite metrics {bad}"), mesh
    record.update({k: float(scores[k]) for k in SCORE_KEYS if k in record})
    return record, mesh


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
    for key in ("f_score", "precision", "recall", "normal_consistency", "iou"):
        if key in per_object[0]:
            out[key] = float(np.mean([r[key] for r in per_object]))
    out["seconds_per_object"] = float(np.mean([r["seconds"] for r in per_object]))
    return out


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


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", text)[:80]


def write_table(per_object: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(per_object[0]))
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


def _check_release_matches(model: str, release, tracking_uri: str) -> None:
    """Metrics of one model must not be attached to another release."""
    from mar3d.registry import get_release

    if model.startswith("models:/"):
        evaluated = get_release(model, tracking_uri)
        if (evaluated.name, evaluated.version) != (release.name, release.version):
            raise ValueError(f"model {model} is release {evaluated.uri}, not {release.uri}: "
                             "refusing to record its metrics on another release")


# ------------------------------------------------------------------------------- main
def evaluate(model: str, dataset: str | Path, output: str | Path, cfg: EvalConfig | None = None,
             tracking_uri: str | None = None, release_uri: str | None = None,
             progress: bool = True, extra_params: dict[str, Any] | None = None) -> EvalResult:
    """Evaluate ``model`` (a release URI or a folder with vae/ lr/ [hr/]) on the prepared
    dataset at ``dataset``; see the module doc for the protocol and where results go.
    ``extra_params`` are logged as MLflow params next to the config."""
    from tqdm import tqdm

    from mar3d import tracking
    from mar3d.registry import get_release, record_metrics

    cfg = cfg or EvalConfig()
    cfg.validate()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    tracking_uri = tracking_uri or tracking.default_tracking_uri(output)
    tracking.check_reachable(tracking_uri)

    # Everything that can fail for reasons other than the model fails before the run.
    fingerprint = dataset_fingerprint(dataset)
    rows = EvalRows(dataset, cfg.view_index, cfg.max_objects)
    release = get_release(release_uri, tracking_uri) if release_uri else None
    if release is not None:
        _check_release_matches(model, release, tracking_uri)
    pipe = MAR3DPipeline.from_pretrained(model, config=copy.deepcopy(cfg.generate), device=cfg.device,
                                         tracking_uri=tracking_uri)

    run_id = tracking.start_or_resume_run(
        tracking_uri, cfg.experiment, cfg.run_name or f"eval-{Path(dataset).resolve().name}",
        tags={"mar3d.kind": "eval", "mar3d.model": model,
              **({"mar3d.release": release.uri} if release else {})})
    try:
        params = {f"eval.{k}": v for k, v in flatten(cfg).items()}
        params.update({"model": model, "dataset.path": str(Path(dataset).resolve()),
                       "dataset.hash": fingerprint["hash"], "dataset.rows": fingerprint["rows"],
                       "num_objects": len(rows), "pipeline.level": "hr" if pipe.uses_hr else "lr",
                       "device": str(pipe.device), **(extra_params or {})})
        tracking.log_params(tracking_uri, run_id, params)

        preview_dir = output / PREVIEW_DIR
        preview_dir.mkdir(exist_ok=True)
        per_object: list[dict[str, Any]] = []
        bar = tqdm(range(len(rows)), desc="evaluate", unit="object", disable=not progress)
        for i in bar:
            row = rows[i]
            record, mesh = evaluate_object(pipe, row, cfg, index=i)
            record["preview"] = ""
            if i < cfg.previews:
                name = f"{i:04d}_{_safe_name(row['uid'])}.png"
                _preview(row, record, mesh, cfg, preview_dir / name)
                record["preview"] = f"{PREVIEW_DIR}/{name}"
            per_object.append(record)
            bar.set_postfix(failed=sum(r["status"] != "ok" for r in per_object))

        metrics = aggregate(per_object)
        failed = [r for r in per_object if r["status"] != "ok"]
        report = {"model": model, "dataset": str(Path(dataset).resolve()), "dataset_fingerprint": fingerprint,
                  "config": to_dict(cfg), "run_id": run_id, "tracking_uri": tracking_uri,
                  "release": release.uri if release else None, "metrics": metrics,
                  "per_object": per_object,
                  "protocol": ("canonical frame, no alignment; normalized by the GT bounding box "
                               "(mar3d.metrics); failed objects count 0 in f_score/normal_consistency/"
                               "iou/precision/recall means and are excluded from the chamfer mean")}
        report_path = output / REPORT_FILE
        report_path.write_text(json.dumps(_json_safe(report), indent=2) + "\n")
        write_table(per_object, output / TABLE_FILE)

        finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
        # MLflow stores +inf as the largest float; a tag says what it means instead.
        tracking.log_metrics(tracking_uri, run_id, finite, step=0,
                             tags={f"nonfinite.{k}": v for k, v in metrics.items() if k not in finite})
        client = tracking.client(tracking_uri)
        client.log_table(run_id, data={k: [_json_safe(r[k]) for r in per_object] for k in per_object[0]},
                         artifact_file="per_object_table.json")
        client.log_artifact(run_id, str(report_path))
        client.log_artifact(run_id, str(output / TABLE_FILE))
        if any(preview_dir.iterdir()):
            client.log_artifacts(run_id, str(preview_dir), PREVIEW_DIR)
        if release is not None:
            record_metrics(release, metrics, run_id, tracking_uri=tracking_uri)
    except BaseException:
        tracking.end_run(tracking_uri, run_id, status="FAILED")
        raise
    tracking.end_run(tracking_uri, run_id, status="FINISHED")
    if failed:
        log.warning("%d of %d objects failed: %s", len(failed), len(per_object),
                    "; ".join(f"{r['uid']}: {r['error']}" for r in failed[:5]))
    return EvalResult(metrics=metrics, per_object=per_object, report_path=report_path, run_id=run_id,
                      failed=failed, tracking_uri=tracking_uri)


def evaluate_components(vae_uri: str, lr_uri: str, hr_uri: str | None, dataset: str | Path,
                        output: str | Path, cfg: EvalConfig | None = None,
                        tracking_uri: str | None = None, progress: bool = True) -> EvalResult:
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
                        progress=progress, extra_params=components)


__all__ = ["EvalConfig", "EvalResult", "aggregate", "assemble_release_dir", "dataset_fingerprint",
           "evaluate", "evaluate_components", "evaluate_object", "occupancy_iou"]
