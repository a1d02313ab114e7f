"""Batch generation: a dataset of images -> meshes + ``results.parquet``, as a Ray Data job.

    mar3d generate --images DIR|PARQUET --model models:/mar3d@champion --output DIR

Inputs (see :func:`list_inputs`):

- a folder of images (recursive; .png .jpg .jpeg .webp .bmp .gif .tif .tiff). Any other
  file in it becomes an error row ``not_image``: nothing is silently ignored. Item id =
  the path relative to the folder (``sub/cat.png`` -> ``sub__cat.png``);
- one Parquet file, or a folder holding only Parquet files, with a binary ``image``
  column (encoded image bytes, or a Hugging Face ``{bytes, path}`` struct) and an
  optional ``id`` column; default id ``<file stem>-<row>``;
- a mar3d shard dataset (``manifest.json`` + ``shards/``): item ``<uid>_v<view>`` is one
  stored condition view (``view_index``, or every view with ``all_views``); its result row
  keeps the object's ``source_uid`` and ``category`` where the shards have them;
- a single image file.

Ids are made safe as file names (characters outside ``[A-Za-z0-9._-]`` -> ``_``, folders
joined with ``__``); ids with ``..``/``.``/empty path parts or absolute paths are refused
(``unsafe_id``), and a second item with the same id gets a ``duplicate_id`` row.

The job: the driver lists items (cheap: paths and row numbers, no pixels) and hands the
ones still to do to ``ray.data.from_items(...).map_batches(_GeneratorActor, ...)``: an
actor pool of ``num_actors`` actors that each load the model once, read their items'
pixels themselves (image files, Parquet row groups, shard rows) and turn each item into
one result row inside a try/except, so one bad image or one failed extraction is an
error row, never a dead job. Meshes are written by the actors, atomically (temporary
file + rename), as ``OUTPUT/meshes/<id>.<fmt>``. The driver streams result rows into a
progress bar and into ``OUTPUT/results.parquet`` (atomic replace, merged with earlier
runs, checkpointed every few seconds so an interrupted job keeps its progress).

Re-runs: an item is skipped when its input is unchanged (file size and mtime, and row /
view, as recorded in ``fingerprint``) and either its previous row is ``ok`` with all
requested mesh files present, or its previous error is deterministic (``not_image``,
``invalid_image``, ``missing_image``, ``no_surface``..., see ``DETERMINISTIC_REASONS``) and
``retry_errors`` is off. Other errors (``internal_error``, ``write_error``: out of memory,
full disk...) are retried. Rows of items that are no longer in the input are kept. An output folder is bound to one
model and one set of generation settings (``generate.json``); reusing it with others is
refused, so one results table never mixes models. ``models:/NAME@ALIAS`` is pinned to the
alias's current version once, in the driver, so an alias moving during the job cannot
mix two models either.

Seeds: item seed = ``base_seed`` + a stable 32-bit hash of the item id (mod 2^32), so a
re-run, a re-ordering or a different batch split gives every image the same seed.

The output may be an ``s3://`` prefix (:mod:`mar3d.storage`): actors then upload each
mesh as one object (visible only when complete, like the local rename), and
``results.parquet``, ``generate.json`` and the contact sheet are objects beside them.

One job per output folder at a time. On a cluster, the model folder (for a local-folder
URI), the input and the output must be on storage every node sees; registry URIs are
downloaded by each actor. The pool is capped at the actors the cluster can hold when the
job starts (a warning says so), so it never waits for CPUs or GPUs that do not exist.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from mar3d import storage
from mar3d.config import from_dict, to_dict
from mar3d.inference import GenerateConfig
from mar3d.ray_runtime import ensure_ray

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MESH_FORMATS = ("glb", "obj", "ply")
RESULTS = "results.parquet"
SETTINGS = "generate.json"
MESHES = "meshes"
CONTACT_SHEET = "contact_sheet.png"

# Errors that the same input, model and settings reproduce exactly: a re-run skips them
# (unless ``retry_errors``). Anything else (``internal_error``, ``write_error``) is retried.
DETERMINISTIC_REASONS = frozenset({"not_image", "invalid_image", "missing_image", "unsafe_id",
                                   "duplicate_id", "no_surface"})

RESULTS_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("input", pa.string()),            # path, or path#row=N (Parquet), or path#uid=U&view=V
    ("source_uid", pa.string()),       # shard inputs: the Objaverse uid / XL fileIdentifier, else null
    ("category", pa.string()),         # shard inputs: the object's LVIS category, else null
    ("status", pa.string()),           # "ok" | "error"
    ("reason", pa.string()),           # null when ok; a short code otherwise (see module doc)
    ("error", pa.string()),            # human-readable message; null when ok
    ("seed", pa.int64()),
    ("outputs", pa.list_(pa.string())),  # mesh files relative to the output folder
    ("level", pa.string()),            # "hr" | "lr": which token level was decoded
    ("num_vertices", pa.int64()),
    ("num_faces", pa.int64()),
    ("load_seconds", pa.float64()),    # reading + validating the image
    ("sample_seconds", pa.float64()),  # MAR-LR (+ MAR-HR) token sampling
    ("decode_seconds", pa.float64()),  # VAE decoding + marching cubes
    ("write_seconds", pa.float64()),
    ("seconds", pa.float64()),         # whole item
    ("model", pa.string()),            # resolved model URI (alias pinned to a version)
    ("worker", pa.string()),           # host:pid of the actor (or "driver")
    ("fingerprint", pa.string()),      # input file size:mtime[:row[:view]] when processed
    ("finished_at", pa.string()),      # UTC ISO time
])

# Labels of a shard row that its results keep (see RESULTS_SCHEMA).
ITEM_LABELS = ("source_uid", "category")
# Item fields passed through Ray (plain strings and ints: cheap to ship, no pixels).
ITEM_FIELDS = ("id", "kind", "source", "row", "view", "column", "input", "fingerprint", "seed",
               *ITEM_LABELS)


@dataclass
class BatchGenerateConfig:
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    num_actors: int = 2
    cpus_per_actor: float = 1.0           # fractional values let several actors share a core
    gpus_per_actor: float | None = None   # None (auto): 1, or a share when actors > GPUs; 0 without GPUs
    use_gpu: bool = True
    batch_size: int = 4                   # items per actor call, sampled as one batch (and per Ray block)
    formats: tuple[str, ...] = ("glb",)   # any of glb / obj / ply
    base_seed: int = 0
    view_index: int = 0                   # shard datasets: which stored view to condition on
    all_views: bool = False               # shard datasets: one item per stored view
    max_items: int | None = None          # only the first N listed items (sorted by id)
    # Shard datasets: rows whose ``source`` label is one of these are left out (the local
    # demo generates for its scans, not for the procedural corpus it trained on); the
    # count left out is logged.
    exclude_sources: tuple[str, ...] = ()
    retry_errors: bool = False            # also redo items with deterministic errors
    checkpoint_seconds: float = 10.0      # rewrite results.parquet at least this often
    # contact_sheet.png: input | generated | ground truth (shard inputs) for the first N
    # items (0: none); logged to MLflow with the job's counts in ``experiment``.
    contact_sheet_items: int = 48
    contact_sheet_resolution: int = 128
    up_axis: str = "auto"                 # world up of the shapes for the sheet's side view:
                                          # auto = the dataset's (shard inputs), else "y"
    experiment: str = "mar3d-generate"

    def validate(self) -> None:
        self.generate.validate()
        if self.num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got {self.num_actors}")
        if self.cpus_per_actor <= 0:
            raise ValueError(f"cpus_per_actor must be > 0, got {self.cpus_per_actor}")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ValueError(f"gpus_per_actor must be >= 0 (or null for auto), got {self.gpus_per_actor}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.formats:
            raise ValueError(f"formats must name at least one of {MESH_FORMATS}")
        bad = [f for f in self.formats if f not in MESH_FORMATS]
        if bad or len(set(self.formats)) != len(self.formats):
            raise ValueError(f"formats must be distinct values from {MESH_FORMATS}, got {list(self.formats)}")
        if not 0 <= self.base_seed < 2 ** 32:
            raise ValueError(f"base_seed must be in [0, 2^32), got {self.base_seed}")
        if self.view_index < 0:
            raise ValueError(f"view_index must be >= 0, got {self.view_index}")
        if self.max_items is not None and self.max_items < 1:
            raise ValueError(f"max_items must be >= 1 (or null for all), got {self.max_items}")
        if self.checkpoint_seconds <= 0:
            raise ValueError(f"checkpoint_seconds must be > 0, got {self.checkpoint_seconds}")
        if self.contact_sheet_items < 0:
            raise ValueError(f"contact_sheet_items must be >= 0, got {self.contact_sheet_items}")
        if not 32 <= self.contact_sheet_resolution <= 1024:
            raise ValueError(f"contact_sheet_resolution must be in [32, 1024], got {self.contact_sheet_resolution}")
        if self.up_axis not in ("auto", "y", "z"):
            raise ValueError(f"up_axis must be auto, y or z, got {self.up_axis!r}")
        if not self.experiment:
            raise ValueError("experiment must be a non-empty MLflow experiment name")


@dataclass
class BatchGenerateResult:
    output: Path | str   # a local folder, or the URI of a remote one
    total: int           # items listed (after max_items), good and bad
    succeeded: int       # new meshes written by this run
    failed: int          # new error rows recorded by this run
    skipped: int         # items already finished (ok or deterministic error) before this run
    results_path: Path | str
    seconds: float
    model: str = ""      # resolved model URI
    reasons: dict[str, int] = field(default_factory=dict)  # this run's error reasons
    contact_sheet: Path | str | None = None
    run_id: str = ""     # the MLflow run holding the job's counts and contact sheet

    @property
    def shapes_per_second(self) -> float:
        return self.succeeded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {"output": str(self.output), "total": self.total, "succeeded": self.succeeded,
                "failed": self.failed, "skipped": self.skipped, "results_path": str(self.results_path),
                "seconds": round(self.seconds, 3), "shapes_per_second": round(self.shapes_per_second, 4),
                "model": self.model, "reasons": dict(self.reasons),
                "contact_sheet": str(self.contact_sheet) if self.contact_sheet else None,
                "run_id": self.run_id}

    def summary(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items()))
        return (f"{self.total} items: {self.succeeded} meshes, {self.failed} errors"
                f"{f' ({reasons})' if reasons else ''}, {self.skipped} already done; "
                f"{self.seconds:.1f} s ({self.shapes_per_second:.2f} shapes/s); results in {self.results_path}"
                + (f"; contact sheet {self.contact_sheet}" if self.contact_sheet else ""))


# ------------------------------------------------------------------------------ items
def item_seed(item_id: str, base_seed: int = 0) -> int:
    """Per-item seed: ``base_seed`` + stable 32-bit hash of the id, mod 2^32."""
    h = int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:4], "big")
    return (base_seed + h) % 2 ** 32


def _fingerprint(path: Path, *extra: int) -> str:
    st = path.stat()
    return ":".join([str(st.st_size), str(st.st_mtime_ns), *map(str, extra)])


def _item(raw_id: str, kind: str, source: Path, input_desc: str, fingerprint: str,
          row: int = -1, view: int = -1, column: str = "", labels: dict | None = None) -> dict:
    return {"raw_id": raw_id, "kind": kind, "source": str(source), "row": row, "view": view,
            "column": column, "input": input_desc, "fingerprint": fingerprint,
            **{k: (labels or {}).get(k) for k in ITEM_LABELS}}


def _image_column(schema: pa.Schema, path: Path) -> str:
    if "image" not in schema.names:
        raise ValueError(f"{path}: Parquet input needs an 'image' column (encoded image bytes); "
                         f"columns are {schema.names}")
    t = schema.field("image").type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "image"
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
        return "image.bytes"  # Hugging Face datasets' Image feature
    raise ValueError(f"{path}: column 'image' must be binary (encoded bytes) or a struct with "
                     f"'bytes', got {t}")


def _list_parquet(files: list[Path], root: Path) -> list[dict]:
    items = []
    for path in files:
        pf = pq.ParquetFile(path)
        column = _image_column(pf.schema_arrow, path)
        ids: list[Any] = [None] * pf.metadata.num_rows
        if "id" in pf.schema_arrow.names:
            ids = pf.read(columns=["id"]).column("id").to_pylist()
        stem = path.relative_to(root).with_suffix("").as_posix() if path != root else path.stem
        for row, given in enumerate(ids):
            raw = str(given) if given is not None else f"{stem}-{row:06d}"
            items.append(_item(raw, "parquet", path, f"{path}#row={row}", _fingerprint(path, row),
                               row=row, column=column))
    return items


def _list_shards(root: Path, cfg: BatchGenerateConfig) -> list[dict]:
    from mar3d.data.prepare import complete_shards, load_manifest
    from mar3d.data.schema import label_columns

    manifest = load_manifest(root)
    num_views = int(manifest["config"]["render_views"])
    if not cfg.all_views and cfg.view_index >= num_views:
        raise ValueError(f"view_index {cfg.view_index} is outside the {num_views} views stored in {root}")
    views = range(num_views) if cfg.all_views else [cfg.view_index]
    items = []
    left_out = 0
    for entry in complete_shards(root, manifest, verify=False):
        path = root / entry["file"]
        present = label_columns(pq.read_schema(path), (*ITEM_LABELS, "source"))  # older shards: none
        rows = pq.read_table(path, columns=["uid", *present]).to_pylist()
        for row, labels in enumerate(rows):  # shards hold one row per row group
            if cfg.exclude_sources and labels.get("source") in cfg.exclude_sources:
                left_out += 1
                continue
            uid = labels["uid"]
            for v in views:
                items.append(_item(f"{uid}_v{v}", "shard", path, f"{path}#uid={uid}&view={v}",
                                   _fingerprint(path, row, v), row=row, view=v, column="images",
                                   labels=labels))
    if left_out:
        log.info("%d rows of %s left out: their source is one of exclude_sources %s",
                 left_out, root, list(cfg.exclude_sources))
    return items


def _walk_files(root: Path, exclude: Path | None) -> list[Path]:
    """Every file under ``root`` (following links), sorted; ``exclude`` (an output folder
    inside the input folder) is not input."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        if exclude is not None:
            dirnames[:] = [d for d in dirnames if (here / d).resolve() != exclude]
        found.extend(here / name for name in filenames)
    return sorted(found)


def _list_folder(root: Path, files: list[Path]) -> list[dict]:
    items = []
    for path in files:
        kind = "file" if path.suffix.lower() in IMAGE_SUFFIXES else "not_image"
        try:
            fp = _fingerprint(path)
        except OSError:  # a dangling link: still one row (the actor reports it missing)
            fp = "missing"
        items.append(_item(path.relative_to(root).as_posix(), kind, path.absolute(),
                           str(path.absolute()), fp))
    return items


def list_inputs(images: str | Path, cfg: BatchGenerateConfig, exclude: str | Path | None = None) -> list[dict]:
    """Items (sorted by id, before ``max_items``) of a folder, Parquet file/folder, shard
    dataset or single image. Each is a dict with ``id`` (safe, or None when refused),
    ``id_error``, ``kind`` ('file', 'parquet', 'shard' or 'not_image'), ``source``,
    ``row``, ``view``, ``column``, ``input``, ``fingerprint``, ``seed``."""
    root = Path(images)
    excl = Path(exclude).resolve() if exclude is not None else None
    if root.is_dir():
        if (root / "manifest.json").is_file() and (root / "shards").is_dir():
            raw = _list_shards(root, cfg)
        else:
            files = _walk_files(root, excl)
            if files and all(p.suffix.lower() == ".parquet" for p in files):
                raw = _list_parquet(files, root)
            else:
                raw = _list_folder(root, files)
    elif root.is_file():
        if root.suffix.lower() == ".parquet":
            raw = _list_parquet([root], root)
        elif root.suffix.lower() in IMAGE_SUFFIXES:
            raw = [_item(root.name, "file", root.absolute(), str(root.absolute()), _fingerprint(root))]
        else:
            raise ValueError(f"{root} is neither an image, a Parquet file nor a folder")
    else:
        raise FileNotFoundError(f"image input {root} does not exist")
    items = []
    for it in raw:
        try:
            item_id, id_error = storage.safe_name(it["raw_id"]), ""
        except ValueError as e:
            item_id, id_error = None, str(e)
        items.append({**it, "id": item_id, "id_error": id_error,
                      "seed": item_seed(item_id, cfg.base_seed) if item_id else -1})
    # Refused ids sort by their raw text, after the good ones.
    items.sort(key=lambda it: (it["id"] is None, it["id"] or it["raw_id"], it["input"]))
    return items[:cfg.max_items] if cfg.max_items else items


# ------------------------------------------------------------------------------ rows
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _result_row(item: dict, status: str, *, reason: str | None = None, error: str | None = None,
                outputs: Iterable[str] = (), model: str = "", worker: str = "driver",
                **extra: Any) -> dict:
    row = {name: None for name in RESULTS_SCHEMA.names}
    row.update({"id": item["id"] if item.get("id") is not None else item.get("raw_id"),
                "input": item["input"], "status": status, "reason": reason, "error": error,
                "seed": item["seed"] if item.get("seed", -1) >= 0 else None, "outputs": list(outputs),
                "model": model, "worker": worker, "fingerprint": item["fingerprint"],
                "finished_at": _now(), **{k: item.get(k) for k in ITEM_LABELS}})
    row.update(extra)
    return row


def mesh_paths(item_id: str, formats: Iterable[str]) -> list[str]:
    """Output-relative mesh paths of one item."""
    return [f"{MESHES}/{item_id}.{fmt}" for fmt in formats]


def _write_mesh_atomic(mesh, path: Path) -> None:
    from mar3d.geometry.extract import save_mesh

    with storage.atomic_local_path(path) as tmp:  # same suffix: same format
        save_mesh(mesh, tmp)


def _upload_mesh(mesh, location: str) -> None:
    """Export to a local file first (the exporters pick the format from the suffix), then
    upload it as one object."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mar3d-out-") as tmp:
        local = Path(tmp) / storage.name(location)
        _write_mesh_atomic(mesh, local)
        storage.write_bytes(location, local.read_bytes())


class ItemReader:
    """Reads an item's pixels (and, for shard items, its ground truth) by reference. The
    last file and row group are cached: consecutive items usually share them."""

    def __init__(self):
        self._file_cache: tuple[str, pq.ParquetFile, list[int]] | None = None
        self._group_cache: tuple[tuple[str, int, tuple[str, ...]], pa.Table] | None = None

    def row_group_table(self, source: str, row: int, columns: list[str]) -> tuple[pa.Table, int]:
        """The row group holding ``row`` (those columns) and the row's offset in it."""
        if self._file_cache is None or self._file_cache[0] != source:
            pf = pq.ParquetFile(source)
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
            self._file_cache = (source, pf, sizes)
        _, pf, sizes = self._file_cache
        start = 0
        for g, n in enumerate(sizes):
            if row < start + n:
                key = (source, g, tuple(columns))
                if self._group_cache is None or self._group_cache[0] != key:
                    self._group_cache = (key, pf.read_row_group(g, columns=list(columns)))
                return self._group_cache[1], row - start
            start += n
        raise IndexError(f"{source} has {start} rows, no row {row}")

    def image(self, item: dict):
        """What :func:`mar3d.inference.load_image` takes: a path, encoded bytes or RGBA pixels."""
        from mar3d.data.schema import column_to_numpy
        from mar3d.inference import InvalidImageError

        kind = item["kind"]
        if kind == "file":
            if not Path(item["source"]).is_file():
                raise FileNotFoundError(f"image file {item['source']} does not exist (or is a dangling link)")
            return item["source"]  # load_image reads and validates the file
        table, offset = self.row_group_table(item["source"], item["row"], [item["column"].split(".")[0]])
        if kind == "parquet":
            value = table.column(0)[offset].as_py()
            if isinstance(value, dict):
                value = value.get("bytes")
            if not value:
                raise InvalidImageError("row has no image bytes (null or empty)")
            return value
        images = column_to_numpy(table.column(0).slice(offset, 1))[0]  # [V, H, W, 4]
        return images[item["view"]]

    def truth(self, item: dict) -> dict | None:
        """A shard item's ground-truth surface and the camera of its view; None otherwise."""
        from mar3d.data.schema import column_to_numpy

        if item["kind"] != "shard":
            return None
        columns = ["surface_0", "cam_world_to_cam", "cam_intrinsics"]
        table, offset = self.row_group_table(item["source"], item["row"], columns)
        row = {c: column_to_numpy(table.column(c).slice(offset, 1))[0] for c in columns}
        return {"surface": row["surface_0"], "world_to_cam": row["cam_world_to_cam"][item["view"]],
                "intrinsics": row["cam_intrinsics"][item["view"]]}


def write_contact_sheet(output: Path | str, rows: dict[str, dict], items: list[dict],
                        cfg: BatchGenerateConfig, up_axis: str = "y") -> Path | str | None:
    """``OUTPUT/contact_sheet.png``: input | generated mesh (from the input's camera when
    the input is a dataset view, else a default one, and turned 90 degrees) | ground truth
    when known, for the first ``contact_sheet_items`` listed items (errors included, with
    their reason). Returns the path, or None when there is nothing to show."""
    import numpy as np
    from PIL import Image

    from mar3d.inference import load_image
    from mar3d.preview import contact_sheet, contact_sheet_row

    reader = ItemReader()
    shown = [it for it in items if it.get("id") in rows][: cfg.contact_sheet_items]
    sheet_rows = []
    for it in shown:
        row = rows[it["id"]]
        try:
            rgba = load_image(reader.image(it), cfg.generate)
        except Exception:  # noqa: BLE001 - an unreadable input is shown as an empty panel
            rgba = np.full((64, 64, 4), 255, np.uint8)
        mesh = None
        if row["status"] == "ok":
            mesh_file = next((storage.join(output, p) for p in row["outputs"]
                              if storage.is_file(storage.join(output, p))), None)
            mesh = _load_mesh(mesh_file) if mesh_file else None
        truth = reader.truth(it)
        gt = None if truth is None else (truth["surface"][:, :3], truth["surface"][:, 3:])
        caption = it["id"] if row["status"] == "ok" else f"{it['id']}: {row['reason']}"
        sheet_rows.append(contact_sheet_row(
            rgba, mesh, gt, truth and truth["world_to_cam"], truth and truth["intrinsics"], up_axis,
            cfg.contact_sheet_resolution, caption=caption[:90]))
    if not sheet_rows:
        return None
    path = storage.join(output, CONTACT_SHEET) if storage.is_remote(output) else output / CONTACT_SHEET
    title = f"{len(shown)} of {len(items)} items, model {rows[shown[0]['id']].get('model') or ''}"
    buf = io.BytesIO()
    Image.fromarray(contact_sheet(sheet_rows, title=title, columns=3)).save(buf, format="PNG")
    storage.write_bytes(path, buf.getvalue())
    return path


def _load_mesh(location: Path | str):
    """trimesh needs a file with the right suffix: a remote mesh is read from a local copy."""
    import tempfile

    import trimesh

    if not storage.is_remote(location):
        return trimesh.load(location, force="mesh")
    with tempfile.TemporaryDirectory(prefix="mar3d-mesh-") as tmp:
        return trimesh.load(storage.download(location, Path(tmp) / storage.name(location)), force="mesh")


class _GeneratorActor:
    """Ray Data callable class: loads the model once, then item batch -> result batch."""

    def __init__(self, model_uri: str, generate: dict, output: str, formats: list[str],
                 tracking_uri: str | None, use_gpu: bool, num_cpus: float):
        import torch

        from mar3d.inference import MAR3DPipeline

        if not use_gpu:
            # Match torch's intra-op threads to the actor's CPU share, so that N actors on
            # N cores do not oversubscribe them.
            torch.set_num_threads(max(1, int(num_cpus)))
        self.output = output if storage.is_remote(output) else Path(output)
        self.formats = list(formats)
        self.model_uri = model_uri
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.pipe = MAR3DPipeline.from_pretrained(model_uri, config=from_dict(GenerateConfig, generate),
                                                  device="cuda" if use_gpu else "cpu",
                                                  tracking_uri=tracking_uri)
        # Pixels are read by reference, in the actor (the driver never holds them).
        self.reader = ItemReader()

    def _error(self, item: dict, reason: str, error: str, timings: dict, **extra) -> dict:
        return _result_row(item, "error", reason=reason, error=error, model=self.model_uri, worker=self.worker,
                           **timings, **extra, seconds=sum(timings.values()))

    def _internal_error(self, item: dict, e: Exception, timings: dict) -> dict:
        tb = traceback.format_exc(limit=4)
        if self.pipe.device.type == "cuda" and "out of memory" in str(e):
            import torch

            torch.cuda.empty_cache()  # let the next item start from a clean allocator
        return self._error(item, "internal_error", f"{type(e).__name__}: {e}\n{tb}"[:4000], timings)

    def _load(self, item: dict) -> tuple[Any, dict, dict | None]:
        """(RGBA pixels or None, timings, error row or None) of one item."""
        from mar3d.inference import InvalidImageError, load_image

        t0 = time.perf_counter()
        timings = {"load_seconds": 0.0, "sample_seconds": 0.0, "decode_seconds": 0.0, "write_seconds": 0.0}
        try:
            rgba = load_image(self.reader.image(item), self.pipe.config)
        except (InvalidImageError, FileNotFoundError) as e:
            reason = "invalid_image" if isinstance(e, InvalidImageError) else "missing_image"
            timings["load_seconds"] = time.perf_counter() - t0
            return None, timings, self._error(item, reason, str(e), timings)
        except Exception as e:  # noqa: BLE001 - one item must never kill the job
            return None, timings, self._internal_error(item, e, timings)
        timings["load_seconds"] = time.perf_counter() - t0
        return rgba, timings, None

    def _sample(self, rgbas: list, seeds: list[int]) -> list[tuple[Any, str] | Exception]:
        """(tokens, level) per item, sampled as one batch. If the batch fails (say, out of
        GPU memory) every item is retried alone, so one item's failure is its own only;
        per-item generators make the retried tokens the batch's."""
        try:
            tokens, level = self.pipe.generate_tokens(rgbas, seed=seeds)
            return [(t, level) for t in tokens.split(1)]
        except Exception as e:  # noqa: BLE001 - becomes the items' error rows
            if len(rgbas) == 1:
                return [e]
        return [self._sample([r], [s])[0] for r, s in zip(rgbas, seeds)]

    def _finish(self, item: dict, tokens, level: str, timings: dict) -> dict:
        """Decode, extract and write one item's mesh."""
        extraction = self.pipe.decode(tokens)
        mesh = extraction.mesh
        timings["decode_seconds"] = extraction.seconds
        if len(mesh.faces) == 0:
            # extract_mesh returns an empty mesh when the field never crosses the level.
            return self._error(item, "no_surface", f"the decoded occupancy field has no surface (no sign "
                               f"change on the {self.pipe.config.resolution}^3 grid: all inside or all "
                               f"outside)", timings, level=level)
        t2 = time.perf_counter()
        rel = mesh_paths(item["id"], self.formats)
        try:
            for r in rel:
                if storage.is_remote(self.output):
                    _upload_mesh(mesh, storage.join(self.output, r))
                    continue
                path = self.output / r
                path.parent.mkdir(parents=True, exist_ok=True)
                _write_mesh_atomic(mesh, path)
        except OSError as e:
            return self._error(item, "write_error", f"{type(e).__name__}: {e}", timings, level=level)
        timings["write_seconds"] = time.perf_counter() - t2
        return _result_row(item, "ok", outputs=rel, level=level, num_vertices=len(mesh.vertices),
                           num_faces=len(mesh.faces), model=self.model_uri, worker=self.worker,
                           **timings, seconds=sum(timings.values()))

    def __call__(self, batch: pa.Table) -> pa.Table:
        """The batch's readable images are sampled together (``batch_size`` items per model
        call); loading, decoding and writing stay per item, and so do errors. An item's
        ``sample_seconds`` is its share of the batch's sampling time."""
        items = batch.to_pylist()
        loaded = [self._load(item) for item in items]
        rows = [error for _, _, error in loaded]
        todo = [i for i, row in enumerate(rows) if row is None]
        if todo:
            t0 = time.perf_counter()
            sampled = self._sample([loaded[i][0] for i in todo], [int(items[i]["seed"]) for i in todo])
            share = (time.perf_counter() - t0) / len(todo)
            for i, result in zip(todo, sampled):
                timings = loaded[i][1]
                timings["sample_seconds"] = share
                try:
                    if isinstance(result, Exception):
                        raise result
                    rows[i] = self._finish(items[i], *result, timings)
                except Exception as e:  # noqa: BLE001 - one item must never kill the job
                    rows[i] = self._internal_error(items[i], e, timings)
        return pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA)


# ------------------------------------------------------------------------------ state
def read_results(output: str | Path) -> pa.Table:
    path = storage.join(output, RESULTS)
    if not storage.is_file(path):
        return RESULTS_SCHEMA.empty_table()
    from mar3d.data.schema import conform

    with storage.open_input(path) as f:
        return conform(pq.read_table(f), RESULTS_SCHEMA)  # older tables lack the label columns


def _write_results(output: Path | str, rows: dict[str, dict]) -> None:
    from mar3d.data.prepare import _write_parquet_atomic

    table = pa.Table.from_pylist(sorted(rows.values(), key=lambda r: r["id"]), schema=RESULTS_SCHEMA)
    _write_parquet_atomic(table, storage.join(output, RESULTS), row_group_size=65536)


def _finished(prev: dict | None, item: dict, cfg: BatchGenerateConfig, output: Path | str) -> bool:
    if prev is None or prev["fingerprint"] != item["fingerprint"]:  # new or changed input
        return False
    if prev["status"] == "ok":
        return all(storage.is_file(storage.join(output, p)) for p in mesh_paths(item["id"], cfg.formats))
    return not cfg.retry_errors and prev["reason"] in DETERMINISTIC_REASONS


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


def _check_settings(output: Path | str, settings: dict) -> None:
    path = storage.join(output, SETTINGS)
    if storage.is_file(path):
        previous = json.loads(storage.read_bytes(path))
        diff = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        if diff:
            raise ValueError(f"{output} holds results of other settings ({', '.join(diff)} differ: "
                             f"{ {k: previous.get(k) for k in diff} } vs { {k: settings.get(k) for k in diff} }); "
                             "use a new output folder")
        return
    storage.write_bytes(path, json.dumps(settings, indent=2).encode())


def _gpus_per_actor(cfg: BatchGenerateConfig) -> float:
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


# ------------------------------------------------------------------------------ job
def batch_generate(images: str | Path, model_uri: str, output: str | Path,
                   cfg: BatchGenerateConfig | None = None, tracking_uri: str | None = None,
                   progress: bool = True) -> BatchGenerateResult:
    """Run the batch generation job (see module docstring)."""
    cfg = cfg or BatchGenerateConfig()
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
    _check_settings(output, {"model": model, "generate": to_dict(cfg.generate), "base_seed": cfg.base_seed})

    rows = {r["id"]: r for r in read_results(output).to_pylist()}
    todo, new_rows, skipped = _triage(items, rows, model, cfg, output)
    reasons: dict[str, int] = {}
    for r in new_rows.values():
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    rows.update(new_rows)
    _write_results(output, rows)
    succeeded, generation_failed = _generate_all(todo, rows, reasons, model, output, cfg,
                                                 tracking_uri, progress)
    result = BatchGenerateResult(output=output, total=len(items), succeeded=succeeded,
                                 failed=len(new_rows) + generation_failed,
                                 skipped=skipped, results_path=storage.join(output, RESULTS)
                                 if remote else output / RESULTS,
                                 seconds=time.perf_counter() - start, model=model, reasons=reasons)
    if cfg.contact_sheet_items:
        result.contact_sheet = write_contact_sheet(output, rows, items, cfg, _up_axis(images, cfg))
    result.run_id = _track(result, images, cfg, tracking_uri)
    return result


def _triage(items: list[dict], rows: dict[str, dict], model: str, cfg: BatchGenerateConfig,
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
                  output: Path | str, cfg: BatchGenerateConfig, tracking_uri: str | None,
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
                fn_constructor_kwargs={"model_uri": model, "generate": to_dict(cfg.generate),
                                       "output": str(output), "formats": list(cfg.formats),
                                       "tracking_uri": tracking_uri, "use_gpu": num_gpus > 0,
                                       "num_cpus": cfg.cpus_per_actor},
                compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cfg.cpus_per_actor,
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


def _log_artifact(client, run_id: str, location: Path | str) -> None:
    """MLflow logs local files: a remote output file is logged from a local copy."""
    import tempfile

    if not storage.is_remote(location):
        client.log_artifact(run_id, str(location))
        return
    with tempfile.TemporaryDirectory(prefix="mar3d-artifact-") as tmp:
        client.log_artifact(run_id, str(storage.download(location, Path(tmp) / storage.name(location))))


def _up_axis(images: str | Path, cfg: BatchGenerateConfig) -> str:
    from mar3d.data.prepare import load_manifest

    if cfg.up_axis != "auto":
        return cfg.up_axis
    manifest = load_manifest(images) if Path(images).is_dir() else None
    return (manifest or {}).get("config", {}).get("render_up_axis", "y")


def _track(result: BatchGenerateResult, images: str | Path, cfg: BatchGenerateConfig,
           tracking_uri: str | None) -> str:
    """One MLflow run per job: settings, counts, throughput and the contact sheet."""
    from mar3d import tracking
    from mar3d.config import flatten

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
        client = tracking.client(uri)
        for path in (result.contact_sheet, storage.join(result.output, SETTINGS)):
            if path is not None and storage.is_file(path):
                _log_artifact(client, run_id, path)
    return run_id
