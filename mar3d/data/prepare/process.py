"""Per-object processing: the function the data job maps over Ray Data rows, turning one
mesh (local, or fetched from object storage with the files it references) into a shard
row, or into an error, never raising.
"""
from __future__ import annotations

import io
import json
import logging
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import trimesh

from ... import storage
from ...config import from_dict
from ..config import DataConfig
from ..errors import MeshError
from ..mesh_io import LoadedMesh, load_mesh, make_uid, sha256_file
from ..render import render_views
from ..sampling import sample_occupancy, sharp_edges, surface_pyramid
from ..schema import NOTES, row_labels, rows_to_batch, shard_schema
from ..watertight import closed_input, make_watertight

log = logging.getLogger(__name__)


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


def _references(local: Path) -> list[str]:
    """Relative names of the files a mesh (or an OBJ's material file) loads beside it."""
    from ..preflight import _MTL_MAP, _gltf_json

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
    from ..preflight import check_reference

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
