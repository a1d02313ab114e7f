"""The data job: mesh files -> Parquet shards (schema v1) + manifest.json + errors.parquet.

``process_mesh(path, cfg)`` is the pure per-mesh function (load, normalize, watertight,
surface pyramid, occupancy, renders); it raises ``MeshError`` for bad input.
``prepare_dataset(input, output, cfg)`` runs it over every input with Ray Data and writes
the shards itself, so that the layout is deterministic and completion is atomic:

- inputs are sorted by path; new rows are grouped into shards of ``cfg.shard_size`` in
  that order and numbered after the shards already present;
- a shard is written to ``shard-XXXXX.parquet.tmp``, fsynced and renamed; it counts as
  complete only once ``manifest.json`` (itself replaced atomically) lists it with its
  sha256, so an interrupted run leaves nothing that looks finished;
- a re-run skips inputs whose uid is in a complete shard and inputs already recorded in
  ``errors.parquet`` with the same content hash (unless ``cfg.retry_errors``);
- every input ends up as a shard row or an errors row: the Ray task catches every
  exception into an error record, and discovery problems (missing files, manifest paths
  escaping the manifest's root, duplicate content, sha256 mismatches) become error rows too.

Inputs (``find_inputs``): a folder of meshes, a manifest listing paths, an Objaverse 1.0
tree or an Objaverse-XL annotations table (:mod:`mar3d.data.sources`, which also selects
objects by ``DataConfig.select_*``); several of them make one dataset. Rows of the
Objaverse layouts keep their labels (``schema.LABEL_COLUMNS``: source uid, category,
name, license, source); error rows keep the source uid. With ``DataConfig.synth_objects``
the job first makes a procedural corpus (:mod:`mar3d.data.synth`) in ``OUTPUT/corpus``
and takes it as one more input.

One job per output directory at a time: leftover ``.tmp`` files and shards that the
manifest does not list are removed at start-up.

Input and output may be ``s3://`` prefixes (:mod:`mar3d.storage`): each Ray task copies
its mesh and the files it references (OBJ materials and textures, glTF buffers and
images; each checked to stay inside the mesh's folder first) into a temporary folder,
because the loaders need real files; rows keep the URI as ``source_path``. On S3 a shard
is one object, visible only once its upload completed, so no ``.tmp`` step is needed.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import trimesh

from .. import storage
from ..config import from_dict, to_dict
from .config import MESH_SUFFIXES, SCHEMA_VERSION, DataConfig
from .errors import MeshError
from .mesh_io import LoadedMesh, load_mesh, make_uid, sha256_file
from .render import render_views
from .sampling import sample_occupancy, sharp_edges, surface_pyramid
from .schema import ERRORS_SCHEMA, LABEL_COLUMNS, NOTES, conform, row_labels, rows_to_batch, shard_schema
from .sources import (Selection, SourceEntry, is_xl_table, object_paths_file, read_objaverse,
                      read_xl_table)
from ..ray_runtime import ensure_ray
from .watertight import closed_input, make_watertight

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CORPUS = "corpus"  # where DataConfig.synth_objects puts the procedural corpus
ERRORS = "errors.parquet"
SHARDS = "shards"
MANIFEST_SUFFIXES = (".json", ".jsonl", ".csv", ".txt", ".lst")


# ----------------------------------------------------------------------------- per mesh
@contextmanager
def cpu_stage(clock: dict[str, float] | None, stage: str):
    """Add the process's CPU seconds (all threads) spent in the block to ``clock[stage]``."""
    start = time.process_time()
    try:
        yield
    finally:
        if clock is not None:
            clock[stage] = clock.get(stage, 0.0) + time.process_time() - start


def process_mesh(path: str | Path, cfg: DataConfig, sha256: str | None = None,
                 source: str | None = None, labels: dict | None = None,
                 clock: dict[str, float] | None = None) -> dict:
    """One dataset row (schema v1) for the mesh at ``path``; raises MeshError. ``source``
    is where the mesh came from when ``path`` is a local copy (its uid and source_path);
    ``labels`` fill the label columns (null where absent); ``clock`` collects CPU seconds
    per stage (load, watertight, sample, label, render)."""
    path = Path(path)
    source = source or str(path)
    with cpu_stage(clock, "load"):
        mesh = load_mesh(path, cfg.max_faces, cfg.max_file_bytes, cfg.normalize_extent,
                         cfg.render_up_axis)
        sha256 = sha256 or sha256_file(path)
    rng = np.random.default_rng([cfg.seed, int(sha256[:12], 16)])
    geometry = sample_geometry(mesh, cfg, rng, source, clock)
    with cpu_stage(clock, "render"):
        renders = render_views(mesh, cfg.view_angles(), cfg.render_resolution, cfg.render_fov_deg,
                               cfg.render_fit_margin, cfg.render_ambient,
                               cfg.render_white_background, cfg.render_up_axis)
    row = {"uid": make_uid(sha256, source), "source_path": source, "source_sha256": sha256,
           "transform": mesh.transform.astype(np.float32), **row_labels(labels or {}),
           NOTES: "; ".join(mesh.notes) or None}
    row.update(geometry)
    row.update({"images": renders.images, "cam_world_to_cam": renders.world_to_cam,
                "cam_intrinsics": renders.intrinsics, "view_elev_azim": renders.elev_azim})
    return row


def sample_geometry(mesh: LoadedMesh, cfg: DataConfig, rng: np.random.Generator,
                    source: str = "mesh", clock: dict[str, float] | None = None) -> dict:
    """The geometry columns of a row: the surface pyramid (``surface_{k}``) and the
    occupancy samples, all from the watertight version of the normalized ``mesh``."""
    with cpu_stage(clock, "watertight"):
        surface, shaded, method = watertight_surface(mesh, cfg, source)
    with cpu_stage(clock, "sample"):
        sharp = sharp_edges(mesh.vertices, mesh.faces, cfg.sharp_edge_angle_deg) \
            if cfg.sharp_edge_fraction > 0 else None
        # Sharp edges of the input lie on a snapped surface already; the offset surface is a
        # voxel away from them.
        project = surface if method == "offset" else None
        levels = surface_pyramid(shaded, cfg.surface_sizes, rng, cfg.sharp_edge_fraction, sharp,
                                 project_sharp_to=project)
    with cpu_stage(clock, "label"):
        occupancy = sample_occupancy(surface, cfg.num_vol, cfg.num_near, cfg.vol_bound,
                                     cfg.near_sigmas, rng, cfg.inside_method)
    return {**{f"surface_{k}": level for k, level in enumerate(levels)}, **occupancy}


def watertight_surface(mesh: LoadedMesh, cfg: DataConfig, source: str = "mesh"
                       ) -> tuple[trimesh.Trimesh, trimesh.Trimesh, str]:
    """(closed mesh to label against, the same surface to sample points and normals on,
    the watertight method it stands for). A mesh that already bounds a solid
    (``closed_input``) is its own closed surface under ``snap``, whose promise is geometry
    on the input's surface, and skips the grid; its samples take normals smoothed within
    ``sharp_edge_angle_deg`` (flat faces keep their own, curved tessellations read as
    curved), where marching-cubes meshes interpolate the distance field's normals."""
    if cfg.watertight_reuse_closed and cfg.watertight_method == "snap":
        closed = closed_input(mesh.vertices, mesh.faces)
        if closed is not None:
            return closed, trimesh.graph.smooth_shade(closed, angle=np.radians(cfg.sharp_edge_angle_deg)), "snap"
    result = make_watertight(mesh.vertices, mesh.faces, cfg.watertight_resolution,
                             cfg.watertight_epsilon_voxels, cfg.normalize_extent, cfg.watertight_method)
    if result.method != cfg.watertight_method:
        log.warning("%s: the snapped watertight mesh enclosed no volume; kept the epsilon-offset "
                    "surface for this mesh", source)
    return result.mesh, result.mesh, result.method


def error_record(source_path: str, reason: str, message: str, sha256: str | None = None,
                 uid: str | None = None, source_uid: str | None = None) -> dict:
    return {"source_path": source_path, "source_sha256": sha256, "uid": uid,
            "reason": reason, "message": message, "source_uid": source_uid or None}


def _serialize_batch(batch: pa.RecordBatch) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue()


def _deserialize_batch(data: bytes) -> pa.RecordBatch:
    with pa.ipc.open_stream(data) as reader:
        return reader.read_next_batch()


def _process_item(item: dict, cfg_dict: dict, with_labels: bool = True, with_notes: bool = True) -> dict:
    """Ray task body: never raises; returns the row as Arrow IPC bytes, or an error."""
    cfg = from_dict(DataConfig, cfg_dict)
    labels = row_labels(item)
    out = {"source_path": item["source_path"], "uid": item["uid"], "ok": False,
           "payload": b"", "reason": "", "message": "", "seconds": 0.0, "stages": "{}"}
    clock: dict[str, float] = {}
    start = time.perf_counter()
    try:
        if storage.is_remote(item["source_path"]):
            with tempfile.TemporaryDirectory(prefix="mar3d-mesh-") as tmp:
                local = fetch_mesh(item["source_path"], Path(tmp), cfg.max_file_bytes)
                row = process_mesh(local, cfg, sha256=item["sha256"], source=item["source_path"],
                                   labels=labels, clock=clock)
        else:
            row = process_mesh(item["source_path"], cfg, sha256=item["sha256"], labels=labels, clock=clock)
        out["payload"] = _serialize_batch(rows_to_batch([row], shard_schema(cfg, with_labels, with_notes)))
        out["ok"] = True
    except MeshError as e:
        out["reason"], out["message"] = e.reason_code, e.message
    except MemoryError as e:
        out["reason"], out["message"] = "internal_error", f"MemoryError: {e}"
    except Exception as e:  # noqa: BLE001 - one bad mesh must not kill the job
        tb = traceback.format_exc(limit=3)
        out["reason"], out["message"] = "internal_error", f"{type(e).__name__}: {e}\n{tb}"[:2000]
    out["seconds"] = time.perf_counter() - start
    out["stages"] = json.dumps(clock)  # a string: rows of every task keep one Arrow type
    return out


def _sha256_location(location: str) -> str:
    if not storage.is_remote(location):
        return sha256_file(location)
    h = hashlib.sha256()
    with storage.open_input(location) as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _hash_item(item: dict) -> dict:
    """Content hash and uid of one input; a hash other than the ``expected_sha256`` its
    table promised (an empty one promises nothing) is a ``sha256_mismatch``."""
    path = item["source_path"]
    try:
        sha = _sha256_location(path)
    except OSError as e:
        return {**item, "sha256": "", "uid": "", "reason": "unreadable", "message": f"{type(e).__name__}: {e}"}
    expected = item.get("expected_sha256") or ""
    if expected and expected != sha:
        # Recorded without the file's hash: a corrected table must make the file eligible again.
        return {**item, "sha256": "", "uid": "", "reason": "sha256_mismatch",
                "message": f"the file's sha256 is {sha}, its table lists {expected}"}
    return {**item, "sha256": sha, "uid": make_uid(sha, path), "reason": "", "message": ""}


# ------------------------------------------------------------------------------- inputs
def _is_mesh_file(path: Path) -> bool:
    return path.suffix.lower() in MESH_SUFFIXES


@dataclass
class Inputs:
    """What discovery found: the mesh files to hash and process, the inputs that already
    failed, and what the input layout says about each file."""
    paths: list[str]                                          # sorted absolute paths (or URIs)
    errors: list[dict] = field(default_factory=list)          # error records
    labels: dict[str, dict] = field(default_factory=dict)     # path -> label columns
    expected_sha256: dict[str, str] = field(default_factory=dict)  # path -> hash its table lists

    def labels_of(self, path: str) -> dict:
        return row_labels(self.labels.get(path, {}))


def discover_inputs(source: str | Path) -> tuple[list[str], list[dict]]:
    """(sorted absolute mesh paths, error records) of any input ``find_inputs`` takes."""
    inputs = find_inputs(source)
    return inputs.paths, inputs.errors


def find_inputs(source: str | Path, selection: Selection = Selection()) -> Inputs:
    """The inputs of a directory of meshes, a manifest file, an Objaverse 1.0 tree (its
    root folder or its ``object-paths.json[.gz]``) or an Objaverse-XL table (``.parquet``,
    or ``.csv`` with a ``fileIdentifier`` column); an ``s3://`` prefix gives the sorted
    URIs of the mesh files under it. ``selection`` applies to the Objaverse layouts only:
    the others have no source uids to select by, so it is refused there."""
    if storage.is_remote(source):
        if not storage.is_dir(source):
            raise FileNotFoundError(f"input {source} is not a prefix holding objects (manifest files "
                                    "are supported for local inputs; give the meshes' prefix)")
        _refuse_selection(selection, source, "an s3:// prefix of meshes")
        return Inputs([u for u in storage.list_files(source) if _is_mesh_file(Path(u))])
    source = Path(source)
    listing = object_paths_file(source)
    if listing is not None:
        return _entries_to_inputs(read_objaverse(listing, selection), listing)
    if source.is_dir():
        _refuse_selection(selection, source, "a folder of meshes")
        return Inputs(_walk_meshes(source))
    if source.is_file() and is_xl_table(source):
        return _entries_to_inputs(read_xl_table(source, selection), source)
    if source.is_file():
        _refuse_selection(selection, source, "a manifest of paths")
        paths, errors = _read_manifest(source)
        return Inputs(paths, errors)
    raise FileNotFoundError(f"input {source} is neither a directory nor a manifest file")


def merge_inputs(found: list[Inputs]) -> Inputs:
    """Several inputs as one: paths sorted (a file two inputs list is taken once)."""
    merged = Inputs([])
    for inputs in found:
        merged.errors += inputs.errors
        merged.labels.update(inputs.labels)
        merged.expected_sha256.update(inputs.expected_sha256)
    merged.paths = sorted({p for inputs in found for p in inputs.paths})
    return merged


def _refuse_selection(selection: Selection, source, kind: str) -> None:
    if not selection.is_empty():
        raise ValueError(f"input {source} is {kind}: selecting by category, uid list or limit "
                         "needs an Objaverse 1.0 tree or an Objaverse-XL table")


def _walk_meshes(root: Path) -> list[str]:
    found = set()
    for dirpath, _, filenames in os.walk(root, followlinks=True):
        for name in filenames:
            p = Path(dirpath) / name
            if _is_mesh_file(p):
                found.add(str(p.absolute()))
    return sorted(found)


def _entries_to_inputs(entries: list[SourceEntry], listing: Path) -> Inputs:
    """Objaverse entries -> inputs: their files checked like manifest entries (inside the
    listing's folder, existing, listed once); entries without a file are not_found rows."""
    root = listing.parent.resolve()
    inputs, found = Inputs([]), set()
    for entry in entries:
        if entry.path is None:
            inputs.errors.append(error_record(
                f"{listing}#{entry.source_uid}", "not_found",
                f"{entry.source_uid!r} has no file in {listing.name} (not listed, or not downloaded)",
                source_uid=entry.source_uid))
            continue
        resolved, error = _check_listed(entry.path, root, found, listing.name)
        if error is not None:
            inputs.errors.append({**error, "source_uid": entry.source_uid})
            continue
        found.add(resolved)
        inputs.labels[resolved] = entry.labels
        if entry.sha256:
            inputs.expected_sha256[resolved] = entry.sha256
    inputs.paths = sorted(found)
    return inputs


def _manifest_entries(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    text = path.read_text()
    if suffix not in MANIFEST_SUFFIXES:
        raise ValueError(f"manifest {path} must end in one of {MANIFEST_SUFFIXES}")

    def entry(value) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, dict) and isinstance(value.get("path"), str):
            return value["path"]
        raise ValueError(f"manifest {path}: entry {value!r} is neither a path nor {{'path': ...}}")

    if suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict):
            data = data.get("paths", data.get("meshes"))
        if not isinstance(data, list):
            raise ValueError(f"manifest {path}: expected a list (or {{'paths': [...]}})")
        return [entry(v) for v in data]
    if suffix == ".jsonl":
        return [entry(json.loads(line)) for line in text.splitlines() if line.strip()]
    if suffix == ".csv":
        rows = list(csv.reader(io.StringIO(text)))
        if not rows:
            return []
        header = [h.strip().lower() for h in rows[0]]
        if "path" in header:
            col = header.index("path")
            return [r[col] for r in rows[1:] if len(r) > col and r[col].strip()]
        return [r[0] for r in rows if r and r[0].strip()]
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _read_manifest(path: Path) -> tuple[list[str], list[dict]]:
    root = path.parent.resolve()
    found, errors = set(), []
    for raw in _manifest_entries(path):
        resolved, error = _check_listed(raw, root, found, "the manifest")
        if error is not None:
            errors.append(error)
        else:
            found.add(resolved)
    return sorted(found), errors


def _check_listed(raw: str, root: Path, found: set[str], lister: str) -> tuple[str | None, dict | None]:
    """(resolved path, None) for a listed file that exists inside ``root`` and is not in
    ``found`` yet, else (None, its error record). ``lister`` names the list in messages."""
    candidate = Path(raw)
    try:
        resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
        is_file = resolved.is_file()
    except (OSError, ValueError) as e:  # NUL bytes, names longer than the OS allows
        shown = raw if len(raw) <= 200 else raw[:200] + f"... ({len(raw)} characters)"
        return None, error_record(raw, "invalid_path", f"{shown!r}: {type(e).__name__}: {e}")
    if not resolved.is_relative_to(root):
        return None, error_record(raw, "path_outside_root",
                                  f"{raw!r} resolves to {resolved}, outside {lister}'s root {root}")
    if not is_file:
        return None, error_record(str(resolved), "not_found", f"{raw!r} does not exist or is not a file")
    if str(resolved) in found:
        return None, error_record(raw, "duplicate", f"{raw!r} names {resolved}, which {lister} "
                                                    "already lists (processed once)")
    return str(resolved), None


def _references(local: Path) -> list[str]:
    """Relative names of the files a mesh (or an OBJ's material file) loads beside it."""
    from .preflight import _MTL_MAP, _gltf_json

    suffix = local.suffix.lower()
    if suffix == ".obj":
        names = []
        with open(local, "rb") as f:
            for raw in f:
                if raw.lstrip().startswith(b"mtllib"):
                    names += raw.decode("utf-8", "replace").split()[1:]
        return names
    if suffix == ".mtl":
        with open(local, "rb") as f:
            matches = (_MTL_MAP.match(raw.decode("utf-8", "replace")) for raw in f)
            return [m.group(2).split()[-1] for m in matches if m]
    if suffix in (".gltf", ".glb"):
        doc = _gltf_json(local) or {}
        return [item["uri"] for kind in ("buffers", "images") for item in doc.get(kind) or []
                if isinstance(item, dict) and isinstance(item.get("uri"), str)
                and not item["uri"].startswith("data:")]
    return []


def fetch_mesh(uri: str, dest: Path, max_file_bytes: int) -> Path:
    """Copy a remote mesh and the files it references into ``dest``; returns the local mesh.

    The size limit is checked before downloading, and every reference is checked to stay
    inside the mesh's folder before it is fetched (a hostile MTL must not make the job
    read other objects of the bucket). Missing references are left to the loader, as
    for local files."""
    from .preflight import check_reference

    size = storage.size(uri)
    if size is None:
        raise MeshError("not_found", f"{uri} does not exist or is not an object")
    if size > max_file_bytes:
        raise MeshError("file_too_large", f"{size} bytes > max_file_bytes={max_file_bytes}")
    local = storage.download(uri, dest / storage.name(uri))
    folder, pending, fetched = storage.parent(uri), _references(local), set()
    while pending:
        ref = pending.pop().strip().replace("\\", "/")
        if ref in fetched:
            continue
        fetched.add(ref)
        check_reference(local, ref, "referenced file")
        source = storage.join(folder, ref)
        ref_size = storage.size(source)
        if ref_size is None:
            continue
        if ref_size > max_file_bytes:
            raise MeshError("file_too_large", f"{source}: {ref_size} bytes > max_file_bytes={max_file_bytes}")
        copied = storage.download(source, dest / ref)
        if copied.suffix.lower() == ".mtl":
            pending += _references(copied)
    return local


# -------------------------------------------------------------------------------- state
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


def _write_parquet_atomic(table: pa.Table, path: Path | str, row_group_size: int) -> str:
    """Write ``table`` atomically to a local path or a URI; returns the file's sha256."""
    if storage.is_remote(path):
        sink = io.BytesIO()
        pq.write_table(table, sink, row_group_size=row_group_size, compression="zstd")
        data = sink.getvalue()
        storage.write_bytes(path, data)
        return hashlib.sha256(data).hexdigest()
    with storage.atomic_local_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd")
        return sha256_file(tmp)


def write_shard(output: Path | str, name: str, batches: list[pa.RecordBatch], schema: pa.Schema) -> dict:
    """Write ``batches`` atomically as the shard ``output/name``; returns its manifest
    entry (file, rows, sha256, bytes)."""
    table = pa.Table.from_batches(batches, schema=schema)
    path = storage.join(output, name)
    # One row group per row: the reader fetches single rows without decoding a shard.
    sha = _write_parquet_atomic(table, path, row_group_size=1)
    return {"file": name, "rows": table.num_rows, "sha256": sha, "bytes": storage.size(path)}


def load_manifest(output: str | Path) -> dict | None:
    path = storage.join(output, MANIFEST)
    if not storage.is_file(path):
        return None
    return json.loads(storage.read_bytes(path))


def complete_shards(output: str | Path, manifest: dict | None = None, verify: bool = True) -> list[dict]:
    """Manifest shard entries whose file exists with the recorded size (and hash)."""
    manifest = manifest if manifest is not None else load_manifest(output)
    if manifest is None:
        return []
    good = []
    for entry in manifest.get("shards", []):
        p = storage.join(output, entry["file"])
        if storage.size(p) != entry["bytes"]:
            continue
        if verify and _sha256_location(p) != entry["sha256"]:
            continue
        good.append(entry)
    return good


def read_errors(output: str | Path) -> pa.Table:
    path = storage.join(output, ERRORS)
    if not storage.is_file(path):
        return ERRORS_SCHEMA.empty_table()
    with storage.open_input(path) as f:
        return conform(pq.read_table(f), ERRORS_SCHEMA)  # older files lack source_uid


def _clean_partial(output: Path | str, listed: set[str]) -> list[str]:
    removed = []
    shard_dir = storage.join(output, SHARDS)
    files = storage.list_files(shard_dir, recursive=False) if storage.is_dir(shard_dir) else []
    for p in files:
        rel = f"{SHARDS}/{storage.name(p)}"
        if storage.is_temporary(p) or rel not in listed:
            storage.delete(p)
            removed.append(rel)
    return removed + storage.remove_temporary(output)


def _manifest_doc(cfg: DataConfig, shards: list[dict], errors: pa.Table, inputs_seen: int,
                  schema: pa.Schema) -> dict:
    reasons: dict[str, int] = {}
    for r in errors.column("reason").to_pylist():
        reasons[r] = reasons.get(r, 0) + 1
    return {
        "format": "mar3d-shapes",
        "schema_version": SCHEMA_VERSION,
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": to_dict(cfg),
        "columns": {f.name: str(f.type) for f in schema},
        "counts": {"rows": sum(s["rows"] for s in shards), "errors": errors.num_rows,
                   "shards": len(shards), "inputs_last_run": inputs_seen},
        "error_reasons": reasons,
        "shards": shards,
        "errors_file": ERRORS,
    }


def _shapes_signature(cfg_dict: dict) -> str:
    cfg = from_dict(DataConfig, cfg_dict)
    return str(shard_schema(cfg).remove_metadata())


def watertight_method(manifest: dict) -> str:
    """The watertight method that made a prepared dataset (see DataConfig)."""
    # Manifests from before the option have no key; all of them were made by "offset".
    return manifest["config"].get("watertight_method", "offset")


# ---------------------------------------------------------------------------------- job
def prepare_dataset(input: str | Path | Sequence[str | Path], output: str | Path,
                    cfg: DataConfig | None = None, progress: bool = True) -> PrepareResult:
    """Run the data job (see module docstring) over one input or several; returns counts
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
    from .synth import SynthConfig, ensure_corpus

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


class _ShardWriter:
    """Collects processed rows into shards of ``shard_size`` and, after every shard,
    rewrites errors.parquet and manifest.json (so an interrupted run loses at most the
    rows of the shard being filled)."""

    def __init__(self, output: Path | str, cfg: DataConfig, shards: list[dict], errors: pa.Table,
                 new_errors: list[dict], inputs_seen: int, with_labels: bool = True, with_notes: bool = True):
        self.output, self.cfg, self.shards, self.errors = output, cfg, shards, errors
        self.new_errors = list(new_errors)
        self.inputs_seen = inputs_seen
        self.with_labels, self.with_notes = with_labels, with_notes
        self.schema = shard_schema(cfg, with_labels, with_notes)
        self.next_index = 1 + max((int(s["file"].split("-")[-1].split(".")[0]) for s in shards), default=-1)
        self.buffer: list[pa.RecordBatch] = []
        self.written: list[str] = []
        self.failed = 0  # inputs that failed during processing

    def add_row(self, batch: pa.RecordBatch) -> None:
        self.buffer.append(batch)
        if len(self.buffer) >= self.cfg.shard_size:
            self.flush()

    def add_error(self, record: dict) -> None:
        self.new_errors.append(record)
        self.failed += 1

    def persist(self) -> None:
        if self.new_errors:
            self.errors = pa.concat_tables([self.errors, pa.Table.from_pylist(self.new_errors, schema=ERRORS_SCHEMA)])
            self.new_errors = []
        sink = io.BytesIO()
        pq.write_table(self.errors, sink)
        storage.write_bytes(storage.join(self.output, ERRORS), sink.getvalue())
        doc = _manifest_doc(self.cfg, self.shards, self.errors, self.inputs_seen, self.schema)
        storage.write_bytes(storage.join(self.output, MANIFEST), json.dumps(doc, indent=2).encode())

    def flush(self) -> None:
        if not self.buffer:
            return
        name = f"{SHARDS}/shard-{self.next_index:05d}.parquet"
        self.shards.append(write_shard(self.output, name, self.buffer, self.schema))
        self.written.append(name)
        self.next_index += 1
        self.buffer = []
        self.persist()


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


