"""The batch generation job: the model it pins, the items it triages, the Ray Data
actor pool that generates the rest, and its MLflow run."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from mar3d import storage
from mar3d.config import to_dict
from mar3d.generate.actor import _GeneratorActor
from mar3d.generate.config import (IMAGE_SUFFIXES, MESHES, RESULTS, SETTINGS, GenerateConfig,
                                   GenerateResult)
from mar3d.generate.contact_sheet import _up_axis, write_contact_sheet
from mar3d.generate.gallery import write_gallery
from mar3d.generate.inputs import ITEM_FIELDS, list_inputs
from mar3d.generate.results import _check_settings, _finished, _result_row, _write_results, read_results
from mar3d.ray_runtime import ensure_ray

log = logging.getLogger(__name__)


def batch_generate(images: str | Path, model_uri: str, output: str | Path,
                   cfg: GenerateConfig | None = None, tracking_uri: str | None = None,
                   progress: bool = True) -> GenerateResult:
    """Run the batch generation job (see the :mod:`mar3d.generate` docstring)."""
    cfg = cfg or GenerateConfig()
    cfg.validate()
    # Bad locations fail here, before the model is resolved or Ray starts.
    storage.check(output, "generation output")
    if storage.is_remote(images):
        raise storage.StorageError(f"image input {images}: batch generation reads local images, "
                                   "Parquet files and shard datasets; copy remote inputs first")
    start = time.perf_counter()
    remote = storage.is_remote(output)
    output = output if remote else Path(output).absolute()
    if not remote and (output.resolve() == Path(images).resolve()
                       or Path(images).resolve().is_relative_to(output.resolve())):
        raise ValueError(f"output {output} must not be the image input {images} or contain it")
    model = _resolve_model(model_uri, tracking_uri)
    items = list_inputs(images, cfg, exclude=None if remote else output)
    storage.makedirs(storage.join(output, MESHES))
    storage.remove_temporary(storage.join(output, MESHES))  # from an earlier, interrupted run
    _check_settings(output, {"model": model, "pipeline": to_dict(cfg.pipeline), "base_seed": cfg.base_seed})

    rows = {r["id"]: r for r in read_results(output).to_pylist()}
    todo, new_rows, skipped = _triage(items, rows, model, cfg, output)
    reasons: dict[str, int] = {}
    for r in new_rows.values():
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    rows.update(new_rows)
    _write_results(output, rows)
    succeeded, generation_failed = _generate_all(todo, rows, reasons, model, output, cfg,
                                                 tracking_uri, progress)
    result = GenerateResult(output=output, total=len(items), succeeded=succeeded,
                            failed=len(new_rows) + generation_failed,
                            skipped=skipped, results_path=storage.join(output, RESULTS)
                            if remote else output / RESULTS,
                            seconds=time.perf_counter() - start, model=model, reasons=reasons)
    up_axis = _up_axis(images, cfg) if cfg.contact_sheet_items or cfg.gallery else "y"
    if cfg.contact_sheet_items:
        result.contact_sheet = write_contact_sheet(output, rows, items, cfg, up_axis)
    if cfg.gallery:
        result.gallery = write_gallery(output, list(rows.values()), up_axis, progress=progress).path
    result.run_id = _track(result, images, items, cfg, tracking_uri)
    return result


def _triage(items: list[dict], rows: dict[str, dict], model: str, cfg: GenerateConfig,
            output: Path | str) -> tuple[list[dict], dict[str, dict], int]:
    """(items to generate, error rows decided here, items skipped): unsafe or duplicate
    ids and non-images get an error row without reaching a model; items finished by an
    earlier run with the same settings are skipped."""
    new_rows: dict[str, dict] = {}
    todo, skipped, seen = [], 0, set()
    for it in items:
        if it["id"] is None:
            row = _result_row({**it, "id": it["raw_id"]}, "error", reason="unsafe_id",
                              error=f"refused id: {it['id_error']}", model=model)
        elif it["id"] in seen:
            row = _result_row(it, "error", reason="duplicate_id", model=model,
                              error=f"id {it['id']!r} is already used by another input; "
                                    "ids must be unique (after making them file-name safe)")
        else:
            seen.add(it["id"])
            if it["kind"] == "not_image":
                row = _result_row(it, "error", reason="not_image", model=model,
                                  error=f"not an image file (suffix {Path(it['source']).suffix or 'none'!r}; "
                                        f"expected one of {', '.join(IMAGE_SUFFIXES)})")
            elif _finished(rows.get(it["id"]), it, cfg, output):
                skipped += 1
                continue
            else:
                todo.append(it)
                continue
        if row["id"] in new_rows or (row["reason"] != "not_image" and row["id"] in seen):
            # Keep the row of the input that owns the id; this one gets its own key.
            row["id"] = f"{row['id']}#{hashlib.sha256(it['input'].encode()).hexdigest()[:12]}"
        # Rows decided in the driver are recorded once; an identical one on a re-run is skipped.
        prev = rows.get(row["id"])
        if prev is not None and prev["reason"] == row["reason"] and prev["fingerprint"] == row["fingerprint"]:
            skipped += 1
        else:
            new_rows[row["id"]] = row
    return todo, new_rows, skipped


def _generate_all(todo: list[dict], rows: dict[str, dict], reasons: dict[str, int], model: str,
                  output: Path | str, cfg: GenerateConfig, tracking_uri: str | None,
                  progress: bool) -> tuple[int, int]:
    """Generate ``todo`` on a Ray Data actor pool into ``rows`` (saved every
    ``checkpoint_seconds`` and on the way out, also on interruption: finished items stay
    finished); counts error ``reasons``. Returns (succeeded, failed)."""
    import ray.data

    from mar3d.logs import progress_bar

    succeeded = failed = 0
    bar = progress_bar(len(todo), "generate", "shape", enabled=progress)
    if todo:
        ensure_ray()
        num_gpus = _gpus_per_actor(cfg)
        actors = _fit_actors(min(cfg.num_actors, len(todo)), cfg.cpus_per_actor, num_gpus)
        ray_items = [{k: it[k] for k in ITEM_FIELDS} for it in todo]
        ctx = ray.data.DataContext.get_current()
        old_bar = ctx.enable_progress_bars
        ctx.enable_progress_bars = False  # our bar counts shapes, not blocks
        last_save = time.monotonic()
        try:
            # Blocks of at most batch_size items, and at least two per actor, so every actor
            # gets work and a slow item does not leave the others idle at the end.
            blocks = min(len(todo), max(-(-len(todo) // cfg.batch_size), 2 * actors))
            ds = ray.data.from_items(ray_items, override_num_blocks=blocks)
            ds = ds.map_batches(
                _GeneratorActor, batch_size=cfg.batch_size, batch_format="pyarrow",
                fn_constructor_kwargs={"model_uri": model, "pipeline": to_dict(cfg.pipeline),
                                       "output": str(output), "formats": list(cfg.formats),
                                       "tracking_uri": tracking_uri, "use_gpu": num_gpus > 0,
                                       "num_cpus": cfg.cpus_per_actor},
                compute=ray.data.ActorPoolStrategy(size=actors),  # a fixed pool of actors
                num_cpus=cfg.cpus_per_actor,
                num_gpus=num_gpus, **storage.ray_task_options(output))
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                for row in batch.to_pylist():
                    rows[row["id"]] = row
                    if row["status"] == "ok":
                        succeeded += 1
                    else:
                        failed += 1
                        reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
                    bar.update(1)
                bar.set_postfix(ok=succeeded, failed=failed)
                if time.monotonic() - last_save > cfg.checkpoint_seconds:
                    _write_results(output, rows)
                    last_save = time.monotonic()
            # Every item has its row and no actor writes any more; an actor that died
            # mid-write left its temporary file behind (its item was retried elsewhere).
            storage.remove_temporary(storage.join(output, MESHES))
        finally:
            ctx.enable_progress_bars = old_bar
            _write_results(output, rows)
    bar.close()
    return succeeded, failed


def _resolve_model(model_uri: str, tracking_uri: str | None) -> str:
    """Validated URI; an alias is pinned to its current release version."""
    from mar3d.inference import resolve_component_dirs
    from mar3d.registry import get_release
    from mar3d.uris import validate_model_uri

    uri = validate_model_uri(model_uri)
    if uri.startswith("models:/"):
        return get_release(uri, tracking_uri).uri
    if uri.startswith("runs:/"):
        raise ValueError(f"{uri}: a run holds one component; give a release (models:/NAME@ALIAS) "
                         "or a folder with vae/, lr/ and hr/")
    resolve_component_dirs(uri)  # fails fast on a folder that is not a release
    return uri


def _gpus_per_actor(cfg: GenerateConfig) -> float:
    import ray

    if not cfg.use_gpu:
        return 0.0
    if cfg.gpus_per_actor is not None:
        return cfg.gpus_per_actor
    # One GPU per actor when there are enough; otherwise the actors share them (inference
    # of one shape rarely fills a GPU), so the pool never waits for GPUs that do not exist.
    gpus = ray.cluster_resources().get("GPU", 0)
    return min(1.0, gpus / cfg.num_actors) if gpus > 0 else 0.0


def _fit_actors(wanted: int, cpus: float, gpus: float) -> int:
    """Actors that the Ray cluster can hold now; fewer than wanted is logged, none is an error
    (otherwise the pool would wait for resources that do not exist)."""
    import ray

    have = ray.cluster_resources()
    fit = int(have.get("CPU", 0) // cpus)
    if gpus > 0:
        fit = min(fit, int(have.get("GPU", 0) // gpus))
    if fit < 1:
        raise ValueError(f"the Ray cluster ({have.get('CPU', 0)} CPUs, {have.get('GPU', 0)} GPUs) cannot "
                         f"hold one actor with {cpus} CPUs and {gpus} GPUs; lower cpus_per_actor / "
                         "gpus_per_actor or set use_gpu=false")
    if fit < wanted:
        log.warning("the Ray cluster holds %d actors of %s CPUs / %s GPUs, not %d: using %d",
                    fit, cpus, gpus, wanted, fit)
    return min(fit, wanted)


def _log_artifact(client, run_id: str, location: Path | str) -> None:
    """MLflow logs local files: a remote output file is logged from a local copy."""
    import tempfile

    if not storage.is_remote(location):
        client.log_artifact(run_id, str(location))
        return
    with tempfile.TemporaryDirectory(prefix="mar3d-artifact-") as tmp:
        client.log_artifact(run_id, str(storage.download(location, Path(tmp) / storage.name(location))))


def _track(result: GenerateResult, images: str | Path, items: list[dict], cfg: GenerateConfig,
           tracking_uri: str | None) -> str:
    """One MLflow run per job: settings, counts, throughput, the contact sheet and gallery; the
    images as its dataset input (digest over the items' ids and file fingerprints), the
    release's models as its model inputs."""
    from mar3d import lineage, tracking
    from mar3d.config import flatten
    from mar3d.registry import component_model_ids, get_release

    uri = tracking_uri or tracking.default_tracking_uri(result.output)
    with tracking.tracked_run(uri, cfg.experiment, f"generate-{storage.name(result.output)}",
                              tags={"mar3d.kind": "generate", "mar3d.model": result.model}) as run:
        run_id = run.run_id
        tracking.log_params(uri, run_id, {"model": result.model, "input": str(Path(images).resolve()),
                                          "output": str(result.output),
                                          **{f"generate.{k}": v for k, v in flatten(cfg).items()}})
        tracking.log_metrics(uri, run_id, {"items": result.total, "succeeded": result.succeeded,
                                           "failed": result.failed, "skipped": result.skipped,
                                           "seconds": result.seconds,
                                           "shapes_per_second": result.shapes_per_second}, step=0)
        listing = sorted((it["raw_id"], it["fingerprint"]) for it in items)
        lineage.log_dataset(uri, run_id, str(Path(images).resolve()),
                            hashlib.sha256(json.dumps(listing).encode()).hexdigest(), "generate",
                            {"items": len(items), "kinds": sorted({it["kind"] for it in items})})
        if result.model.startswith("models:/"):
            lineage.log_model_inputs(uri, run_id, component_model_ids(get_release(result.model, uri), uri))
        client = tracking.client(uri)
        for path in (result.contact_sheet, result.gallery, storage.join(result.output, SETTINGS)):
            if path is not None and storage.is_file(path):
                _log_artifact(client, run_id, path)
    return run_id
