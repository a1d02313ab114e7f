"""The evaluate job: every group of one model (and its champion) scored, written to the
output folder or object storage, and logged to one MLflow run (and the release)."""
from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mar3d import lineage, storage
from mar3d.config import flatten, to_dict
from mar3d.evaluate.baseline import _group_baselines, baseline_record
from mar3d.evaluate.config import (GROUP_DESCRIPTIONS, PREVIEW_DIR, REPORT_FILE, SHEET_DIR, TABLE_FILE,
                                   VIEW_DIR, EvalConfig, EvalResult)
from mar3d.evaluate.groups import EvalRows, dataset_fingerprint, protocol_fingerprint, select_groups
from mar3d.evaluate.release import assemble_release_dir
from mar3d.evaluate.reporting import (_group_contact_sheet, _group_view_page, _json_safe, _preview,
                                      _write_matrix, _write_rows, write_table)
from mar3d.evaluate.scoring import _GroupScoring, _score_group, strided
from mar3d.inference import MAR3DPipeline
from mar3d.logs import progress_bar
from mar3d.metrics import (aggregate, category_following, cross_chamfer, following_metrics, pairwise_chamfer,
                           per_category)

log = logging.getLogger(__name__)


def evaluate(model: str, dataset: str | Path, output: str | Path, cfg: EvalConfig | None = None,
             tracking_uri: str | None = None, release_uri: str | None = None,
             progress: bool = True, extra_params: dict[str, Any] | None = None,
             compare_to: str | None = None, model_ids: list[str] | None = None) -> EvalResult:
    """Evaluate ``model`` (a release URI or a folder with vae/ lr/ [hr/]) on the prepared
    dataset at ``dataset``; see :mod:`mar3d.evaluate` for groups, protocol and outputs.
    ``compare_to`` (e.g. ``models:/mar3d@champion``) is scored on the same objects too.
    ``extra_params`` are logged as MLflow params next to the config; ``model_ids``: the
    MLflow logged models ``model`` was made of, when no registered release names them
    (the run's model inputs, beside the release's and the champion's components)."""
    from mar3d import tracking
    from mar3d.data.dataset import ShapeDataset
    from mar3d.registry import component_model_ids, get_release

    cfg = cfg or EvalConfig()
    cfg.validate()
    # Bad locations fail here, before any model is loaded.
    storage.check(dataset, "evaluation dataset", must_exist=True)
    storage.check(output, "evaluation output")
    if storage.is_remote(output):
        return _evaluate_to_remote(model, dataset, str(output), cfg, tracking_uri, release_uri,
                                   progress, extra_params, compare_to, model_ids)
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
        pipe=MAR3DPipeline.from_pretrained(model, config=copy.deepcopy(cfg.pipeline), device=cfg.device,
                                           tracking_uri=tracking_uri),
        model=model,
        champion=champion,
        champion_pipe=(MAR3DPipeline.from_pretrained(champion.uri, config=copy.deepcopy(cfg.pipeline),
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
        lineage.log_prepared_dataset(tracking_uri, run_id, str(dataset), fingerprint, "eval",
                                     {"groups": {g.name: len(g.indices) for g in groups}})
        lineage.log_model_inputs(tracking_uri, run_id, [
            *component_model_ids(release, tracking_uri), *(model_ids or []),
            *component_model_ids(champion, tracking_uri)])

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
        pages = {o.name: o.page for o in outcomes if o.page is not None}
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
                      failed=failed, tracking_uri=tracking_uri, contact_sheets=sheets, view_pages=pages)


def _check_release_matches(model: str, release, tracking_uri: str) -> None:
    """Metrics of one model must not be attached to another release."""
    from mar3d.registry import get_release

    if model.startswith("models:/"):
        evaluated = get_release(model, tracking_uri)
        if (evaluated.name, evaluated.version) != (release.name, release.version):
            raise ValueError(f"model {model} is release {evaluated.uri}, not {release.uri}: "
                             "refusing to record its metrics on another release")


def _run_params(model: str, dataset, fingerprint: dict, cfg: EvalConfig, ctx: "_GroupScoring",
                groups, extra_params: dict[str, Any] | None) -> dict[str, Any]:
    """The evaluation run's MLflow params: config, model, dataset identity, groups."""
    params = {f"eval.{k}": v for k, v in flatten(cfg).items()}
    params.update({"model": model, "dataset.path": _dataset_path(dataset),
                   "dataset.hash": fingerprint["hash"], "dataset.rows": fingerprint["rows"],
                   "pipeline.level": ctx.pipe.output_level, "device": str(ctx.pipe.device),
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
            "view_pages": {o.name: str(o.page.relative_to(ctx.output)) for o in outcomes
                           if o.page is not None},
            "protocol": ("canonical frame, no alignment; per-object scores normalized by the GT "
                         "bounding box (mar3d.metrics), Chamfer matrices in the dataset frame; "
                         "failed objects count 0 in f_score/normal_consistency/iou/precision/"
                         "recall means and as retrieval misses, and are excluded from the "
                         "chamfer mean")}


@dataclass
class _GroupOutcome:
    name: str
    doc: dict[str, Any]                       # the group's section of report.json
    records: list[dict[str, Any]] = field(default_factory=list)
    champion_records: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    sheet: Path | None = None
    page: Path | None = None                  # the group's rotatable 3D page


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
    if cfg.view_pages:
        outcome.page = _group_view_page(ctx, group, group_rows, scored, nearest, candidate,
                                        doc.get("baseline") or {})
    return outcome


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
    for folder in (PREVIEW_DIR, SHEET_DIR, VIEW_DIR):
        if (output / folder).is_dir() and any((output / folder).iterdir()):
            client.log_artifacts(run_id, str(output / folder), folder)
    if release is not None:
        record_metrics(release, metrics, run_id, tracking_uri=tracking_uri, tags=tags)


def _dataset_path(dataset: str | Path) -> str:
    return str(dataset) if storage.is_remote(dataset) else str(Path(dataset).resolve())


def _evaluate_to_remote(model, dataset, output: str, cfg, tracking_uri, release_uri, progress,
                        extra_params, compare_to, model_ids) -> EvalResult:
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
                          compare_to=compare_to, model_ids=model_ids)
        storage.upload_dir(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result.report_path = storage.join(output, REPORT_FILE)
    result.contact_sheets = {g: storage.join(output, Path(p).relative_to(staging).as_posix())
                             for g, p in result.contact_sheets.items()}
    result.view_pages = {g: storage.join(output, Path(p).relative_to(staging).as_posix())
                         for g, p in result.view_pages.items()}
    return result


def evaluate_components(vae_uri: str, lr_uri: str, hr_uri: str | None, dataset: str | Path,
                        output: str | Path, cfg: EvalConfig | None = None,
                        tracking_uri: str | None = None, progress: bool = True,
                        compare_to: str | None = None) -> EvalResult:
    """:func:`evaluate` for three separately given components (no registered release)."""
    from mar3d.tracking import default_tracking_uri

    cfg = cfg or EvalConfig()
    if hr_uri is None and cfg.pipeline.use_hr:
        raise ValueError("no MAR-HR model given: pass hr_uri or set pipeline.use_hr=false")
    tracking_uri = tracking_uri or default_tracking_uri(output)
    components = {"model.vae": vae_uri, "model.lr": lr_uri, "model.hr": hr_uri or ""}
    with tempfile.TemporaryDirectory(prefix="mar3d-eval-release-") as tmp:
        release_dir = assemble_release_dir(vae_uri, lr_uri, hr_uri, tmp, tracking_uri=tracking_uri)
        return evaluate(str(release_dir), dataset, output, cfg, tracking_uri=tracking_uri,
                        progress=progress, extra_params=components, compare_to=compare_to,
                        model_ids=lineage.produced_model_ids(tracking_uri, [vae_uri, lr_uri, hr_uri or ""]))
