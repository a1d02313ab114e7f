"""The data job: ``prepare_dataset`` finds and hashes the inputs, decides what an earlier
run into the same output already did (resume and skip), processes the rest as Ray Data
tasks and hands their rows to the shard writer in input order.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from ... import storage
from ...config import to_dict
from ...ray_runtime import ensure_ray
from ..config import SCHEMA_VERSION, DataConfig
from ..schema import ERRORS_SCHEMA, LABEL_COLUMNS, NOTES
from ..sources import Selection
from .inputs import Inputs, _hash_item, find_inputs, merge_inputs
from .process import _deserialize_batch, _process_item, cpu_stage
from .shards import (ERRORS, SHARDS, _clean_partial, _shapes_signature, _ShardWriter, complete_shards,
                     error_record, load_manifest, read_errors, watertight_method)

log = logging.getLogger(__name__)

CORPUS = "corpus"  # where DataConfig.synth_objects puts the procedural corpus


@dataclass
class PrepareResult:
    output: Path | str  # a local folder, or the URI of a remote one
    inputs: int  # mesh paths found (plus manifest entries that were rejected)
    processed: int  # new rows written by this run
    failed: int  # new error rows recorded by this run
    skipped: int  # inputs already complete (row or recorded error) before this run
    total_rows: int
    total_errors: int
    shards_written: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # CPU seconds of this run's meshes by stage (load, watertight, sample, label, render:
    # summed over the tasks) and the driver's shard writing ("write", its own CPU).
    stage_cpu_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def meshes_per_second(self) -> float:
        return (self.processed + self.failed) / self.seconds if self.seconds > 0 else 0.0

    @property
    def num_rows(self) -> int:
        """Rows in the whole dataset (all complete shards), not only this run's."""
        return self.total_rows

    @property
    def num_errors(self) -> int:
        """Error rows in the whole dataset (errors.parquet)."""
        return self.total_errors

    def to_dict(self) -> dict:
        return {"output": str(self.output), "inputs": self.inputs, "processed": self.processed,
                "failed": self.failed, "skipped": self.skipped, "num_rows": self.total_rows,
                "num_errors": self.total_errors, "shards_written": list(self.shards_written),
                "seconds": round(self.seconds, 3), "meshes_per_second": round(self.meshes_per_second, 3),
                "stage_cpu_seconds": {k: round(v, 3) for k, v in self.stage_cpu_seconds.items()}}

    def summary(self) -> str:
        return (f"{self.inputs} inputs: {self.processed} new rows, {self.failed} new errors, "
                f"{self.skipped} already done; dataset {self.output} has {self.total_rows} rows, "
                f"{self.total_errors} errors (see {ERRORS}); {len(self.shards_written)} shards written "
                f"in {self.seconds:.1f} s")


def prepare_dataset(input: str | Path | Sequence[str | Path], output: str | Path,
                    cfg: DataConfig | None = None, progress: bool = True) -> PrepareResult:
    """Run the data job (see the package docstring) over one input or several; returns counts
    for this run and totals."""
    cfg = cfg or DataConfig()
    cfg.validate()
    sources = [input] if isinstance(input, (str, Path)) else list(input)
    if not sources:
        raise ValueError("no input given: name at least one folder, manifest or Objaverse layout")
    # Bad locations fail here, before Ray starts or anything is read.
    for source in sources:
        storage.check(source, "mesh input", must_exist=True)
    storage.check(output, "dataset output")
    if cfg.synth_objects and storage.is_remote(output):
        raise ValueError(f"synth_objects needs a local output (the corpus is written beside the "
                         f"shards); for {output}, make it with `mar3d data synth` on storage every "
                         "worker reads and give it as one more --input")
    start = time.perf_counter()
    # Discovery before the output is touched: a bad selection (unknown category, missing
    # uid file) leaves nothing behind.
    selection = Selection.from_config(cfg)
    found = [find_inputs(source, selection) for source in sources]
    output = output if storage.is_remote(output) else Path(output)
    storage.makedirs(storage.join(output, SHARDS))
    if cfg.synth_objects:
        corpus = _make_corpus(Path(output) / CORPUS, cfg, progress)
        sources.append(corpus)
        found.append(find_inputs(corpus, selection))
    inputs = merge_inputs(found)
    shards, done_uids, with_labels = _open_existing(output, cfg)
    with_notes = _keeps_column(output, shards, NOTES)
    errors = read_errors(output)
    if inputs.labels and not with_labels:
        log.warning("%s was written before shards had label columns (%s); this run keeps its "
                    "schema, so the Objaverse labels of its rows are not stored: use a new output "
                    "directory to keep them", output, ", ".join(LABEL_COLUMNS))
    ensure_ray()
    plan = _plan(_hash_inputs(inputs, *sources), inputs.errors, errors, done_uids, cfg)
    writer = _ShardWriter(output, cfg, shards, plan.errors, plan.new_errors,
                          inputs_seen=len(inputs.paths) + len(inputs.errors), with_labels=with_labels,
                          with_notes=with_notes)
    processed, stages = _process(plan.todo, sources, cfg, writer, progress)
    with cpu_stage(stages, "write"):
        writer.flush()
        writer.persist()
    return PrepareResult(output=output, inputs=writer.inputs_seen, processed=processed,
                         failed=len(plan.new_errors) + writer.failed, skipped=plan.skipped,
                         total_rows=sum(s["rows"] for s in writer.shards),
                         total_errors=writer.errors.num_rows, shards_written=writer.written,
                         seconds=time.perf_counter() - start, stage_cpu_seconds=stages)


def _open_existing(output: Path | str, cfg: DataConfig) -> tuple[list[dict], set[str], bool]:
    """The complete shards of an earlier run into ``output`` (leftovers of an interrupted
    one removed), the uids they hold and whether new shards get the label columns (not
    when the existing ones lack them: one schema per dataset); refuses an output of
    another schema version or shape."""
    manifest = load_manifest(output)
    if manifest is not None and manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{output} holds schema v{manifest.get('schema_version')}, this code writes v{SCHEMA_VERSION}")
    if manifest is not None and _shapes_signature(manifest["config"]) != _shapes_signature(to_dict(cfg)):
        raise ValueError(f"{output} was prepared with a config of different tensor shapes; "
                         "use a new output directory (shards of one dataset share one schema)")
    if manifest is not None and watertight_method(manifest) != cfg.watertight_method:
        raise ValueError(f"{output} was prepared with watertight_method={watertight_method(manifest)!r}, "
                         f"this run uses {cfg.watertight_method!r}: rows of the two describe different "
                         "surfaces, so use a new output directory (or --set "
                         f"watertight_method={watertight_method(manifest)} to add to this one)")
    shards = complete_shards(output, manifest)
    _clean_partial(output, {s["file"] for s in shards})
    done_uids: set[str] = set()
    for s in shards:
        with storage.open_input(storage.join(output, s["file"])) as f:
            done_uids.update(pq.read_table(f, columns=["uid"]).column("uid").to_pylist())
    with_labels = not shards or set(LABEL_COLUMNS) <= set(manifest.get("columns", {}))
    return shards, done_uids, with_labels


def _keeps_column(output: Path | str, shards: list[dict], name: str) -> bool:
    """Whether new shards get the optional column ``name``: yes, unless the dataset's
    existing shards were written without it (one schema per dataset)."""
    if not shards:
        return True
    return name in (load_manifest(output) or {}).get("columns", {})


def _make_corpus(root: Path, cfg: DataConfig, progress: bool) -> Path:
    """The procedural corpus of ``cfg.synth_objects`` objects at ``root`` (made once)."""
    from ..synth import SynthConfig, ensure_corpus

    made = ensure_corpus(root, SynthConfig(num_objects=cfg.synth_objects, seed=cfg.synth_seed,
                                           workers=cfg.num_workers), progress)
    if made is not None:
        log.info("%s", made.summary())
    return root


def _hash_inputs(inputs: Inputs, *locations: str | Path) -> list[dict]:
    """Content hashes (uids) of every input, in parallel, so finished inputs are skipped
    cheaply; sorted by path, each with its labels."""
    import ray.data

    if not inputs.paths:
        return []
    items = [{"source_path": p, "expected_sha256": inputs.expected_sha256.get(p, "")}
             for p in inputs.paths]
    hashed = list(ray.data.from_items(items, override_num_blocks=min(len(items), 64))
                  .map(_hash_item, **storage.ray_task_options(*locations)).iter_rows())
    return sorted(({**h, **inputs.labels_of(h["source_path"])} for h in hashed),
                  key=lambda r: r["source_path"])


@dataclass
class _Plan:
    todo: list[dict]            # inputs to process now
    new_errors: list[dict]      # error rows found before processing
    skipped: int                # inputs already done (or already failed, without retry_errors)
    errors: pa.Table            # the earlier runs' error rows still valid


def _plan(hashed: list[dict], discovery_errors: list[dict], errors: pa.Table, done_uids: set[str],
          cfg: DataConfig) -> _Plan:
    """Which inputs to process: not in a complete shard, not a known failure (unless
    ``retry_errors``), not a duplicate of another input of this run."""
    old_errors = {(r["source_path"], r["source_sha256"]) for r in errors.to_pylist()}
    # Errors found before processing (no content hash) are recorded once per (path, reason).
    old_error_keys = {(r["source_path"], r["reason"]) for r in errors.to_pylist()}
    pre_errors = discovery_errors + [error_record(h["source_path"], h["reason"], h["message"],
                                                  source_uid=h.get("source_uid"))
                                     for h in hashed if h["reason"]]
    new_errors = [e for e in pre_errors if (e["source_path"], e["reason"]) not in old_error_keys]
    skipped = len(pre_errors) - len(new_errors)
    todo, seen_uid = [], {}
    drop_error_paths = set()
    for item in hashed:
        if item["reason"]:
            continue
        uid = item["uid"]
        if uid in done_uids:
            skipped += 1
            continue
        if (item["source_path"], item["sha256"]) in old_errors and not cfg.retry_errors:
            skipped += 1
            continue
        drop_error_paths.add(item["source_path"])  # retried or changed: replace its old error
        if uid in seen_uid:
            new_errors.append(error_record(item["source_path"], "duplicate",
                                           f"same content and name as {seen_uid[uid]}",
                                           item["sha256"], uid, item.get("source_uid")))
            continue
        seen_uid[uid] = item["source_path"]
        todo.append(item)
    if drop_error_paths:
        keep = [r for r in errors.to_pylist() if r["source_path"] not in drop_error_paths]
        errors = pa.Table.from_pylist(keep, schema=ERRORS_SCHEMA)
    return _Plan(todo, new_errors, skipped, errors)


def _process(todo: list[dict], sources: list[str | Path], cfg: DataConfig, writer: _ShardWriter,
             progress: bool) -> tuple[int, dict[str, float]]:
    """Process ``todo`` with Ray Data tasks into ``writer``, in input order; returns the
    number of rows written and the CPU seconds by stage (tasks' stages summed, the
    driver's shard writing as "write")."""
    import ray.data

    from mar3d.logs import progress_bar

    processed, stages = 0, {}
    todo_by_path = {t["source_path"]: t for t in todo}
    bar = progress_bar(len(todo), "meshes", "mesh", enabled=progress)
    if todo:
        ctx = ray.data.DataContext.get_current()
        old_order, old_bar = ctx.execution_options.preserve_order, ctx.enable_progress_bars
        ctx.execution_options.preserve_order = True  # deterministic shard contents
        ctx.enable_progress_bars = False  # our bar counts meshes, not blocks
        try:
            ds = ray.data.from_items(todo, override_num_blocks=len(todo)).map(
                _process_item, fn_kwargs={"cfg_dict": to_dict(cfg), "with_labels": writer.with_labels,
                                          "with_notes": writer.with_notes},
                num_cpus=cfg.cpus_per_task,
                compute=ray.data.TaskPoolStrategy(size=min(cfg.num_workers, len(todo))),
                **storage.ray_task_options(*sources))
            for result in ds.iter_rows():
                for stage, seconds in json.loads(result["stages"]).items():
                    stages[stage] = stages.get(stage, 0.0) + seconds
                with cpu_stage(stages, "write"):
                    if result["ok"]:
                        writer.add_row(_deserialize_batch(result["payload"]))
                        processed += 1
                    else:
                        item = todo_by_path[result["source_path"]]
                        writer.add_error(error_record(result["source_path"], result["reason"],
                                                      result["message"], item["sha256"], item["uid"],
                                                      item.get("source_uid")))
                bar.update(1)
                bar.set_postfix(done=processed, failed=writer.failed)
        finally:
            ctx.execution_options.preserve_order = old_order
            ctx.enable_progress_bars = old_bar
    bar.close()
    return processed, stages
