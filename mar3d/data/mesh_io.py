"""Load a mesh file, flatten its scene, validate it and normalize it to the unit cube.

Every failure is a ``MeshError(reason_code, message)`` so the job can record it as an
error row; the reason codes are a closed set (``errors.REASONS``) that reports can count.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trimesh

from .config import MESH_SUFFIXES
from .errors import MeshError
from .gltf import GLTF_SUFFIXES, as_plain_glb
from .preflight import preflight
from .scenery import scenery_parts

@dataclass
class LoadedMesh:
    """A flattened, validated, normalized mesh.

    ``parts`` keep their own visuals (textures, colours) for rendering; ``vertices`` /
    ``faces`` are the concatenated geometry used for everything else, and
    ``face_part`` / ``face_offset`` map a concatenated face back to its part.
    """

    parts: list[trimesh.Trimesh]
    vertices: np.ndarray  # float64 [V,3], normalized
    faces: np.ndarray  # int64 [F,3]
    face_part: np.ndarray  # int64 [F]
    face_offset: np.ndarray  # int64 [num_parts]: first concatenated face of each part
    transform: np.ndarray  # float64 [4,4]: original coords -> normalized coords
    # What the loader left out of the file and why (scenery around the object), for the row.
    notes: tuple[str, ...] = ()

    @property
    def mesh(self) -> trimesh.Trimesh:
        return trimesh.Trimesh(self.vertices, self.faces, process=False)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def make_uid(sha256: str, path: str | Path) -> str:
    """Stable id: content hash prefix + stem (the stem alone collides: every YCB object is
    ``textured.obj``, so the parent folder name is included when the stem is generic)."""
    p = Path(path)
    stem = p.stem if p.stem not in ("textured", "model", "mesh", "scene") else f"{p.parent.name}-{p.stem}"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:64]
    return f"{sha256[:16]}-{safe}"


def check_file(path: Path, max_file_bytes: int) -> None:
    if not path.is_file():
        raise MeshError("not_found", f"{path} does not exist or is not a file")
    if path.suffix.lower() not in MESH_SUFFIXES:
        raise MeshError("unsupported_format", f"{path.suffix!r} is not one of {MESH_SUFFIXES}")
    size = path.stat().st_size
    if size > max_file_bytes:
        raise MeshError("file_too_large", f"{size} bytes > max_file_bytes={max_file_bytes}")
    if size == 0:
        raise MeshError("empty", "the file has 0 bytes")


def _flatten(loaded) -> list[trimesh.Trimesh]:
    """All triangle geometry of a scene in world coordinates (points and paths dropped),
    each part named by its scene node in ``metadata["node"]``."""
    if isinstance(loaded, trimesh.Trimesh):
        loaded.metadata["node"] = "mesh"
        return [loaded]
    if isinstance(loaded, trimesh.Scene):
        parts = []
        for node in loaded.graph.nodes_geometry:
            transform, name = loaded.graph[node]
            geom = loaded.geometry.get(name)
            if isinstance(geom, trimesh.Trimesh) and len(geom.faces) > 0:
                g = _copy_with_colors(geom)
                g.apply_transform(transform)
                g.metadata["node"] = str(node)
                parts.append(g)
        return parts
    return []


def _copy_with_colors(geom: trimesh.Trimesh) -> trimesh.Trimesh:
    """``geom.copy()`` keeping the vertex colours of a textured visual (glTF COLOR_0 under
    a material, which multiplies the base colour): trimesh's copy drops them."""
    copied = geom.copy()
    colors = getattr(geom.visual, "vertex_attributes", {}).get("color")
    if colors is not None and isinstance(copied.visual, trimesh.visual.TextureVisuals):
        copied.visual.vertex_attributes["color"] = np.array(colors)
    return copied


def drop_scenery(parts: list[trimesh.Trimesh]) -> tuple[list[trimesh.Trimesh], tuple[str, ...]]:
    """``parts`` without the skybox, ground plane or backdrop around the object
    (:mod:`mar3d.data.scenery`), and a note for each part dropped."""
    names = [p.metadata.get("node", f"part {i}") for i, p in enumerate(parts)]
    scenery = scenery_parts(parts, names)
    dropped = {i for i, _ in scenery}
    notes = tuple(f"dropped {names[i]!r} ({len(parts[i].faces)} faces): {why}" for i, why in sorted(scenery))
    return [p for i, p in enumerate(parts) if i not in dropped], notes


def normalization_transform(vertices: np.ndarray, extent: float) -> np.ndarray:
    """Centre the bounding box and scale its longest half-side to ``extent``."""
    lo, hi = vertices.min(0), vertices.max(0)
    center = (lo + hi) / 2.0
    half = float((hi - lo).max()) / 2.0
    scale = extent / half
    t = np.eye(4)
    t[:3, :3] *= scale
    t[:3, 3] = -center * scale
    return t


# glTF's frame is +Y up by its specification; a z-up dataset (YCB-style scans) takes glTF
# objects turned +90 degrees about x, so that their up becomes +Z: (x, y, z) -> (x, -z, y).
_Y_UP_TO_Z_UP = np.array([[1.0, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])


def frame_transform(path: Path, up_axis: str) -> np.ndarray:
    """The rotation that brings the file's own frame into a dataset whose world up is
    ``up_axis``. Only glTF states its up axis (+Y); OBJ, PLY, STL and OFF have no
    convention, so they are taken as already being in the dataset's frame."""
    if up_axis not in ("y", "z"):
        raise ValueError(f"up_axis must be 'y' or 'z', got {up_axis!r}")
    if up_axis == "z" and path.suffix.lower() in GLTF_SUFFIXES:
        return _Y_UP_TO_Z_UP.copy()
    return np.eye(4)


def load_scene(path: Path, max_faces: int):
    """trimesh's reading of ``path``; glTF files that trimesh would misread (compressed,
    quantized, sparse, strips/fans) are handed over rewritten into plain glTF."""
    # process=False keeps UV seams and NaNs as they are, so validation sees the raw data.
    plain = as_plain_glb(path, max_faces) if path.suffix.lower() in GLTF_SUFFIXES else None
    if plain is None:
        return trimesh.load(str(path), process=False)
    # The resolver finds the images a .gltf names beside it (their URIs are kept as is).
    return trimesh.load(file_obj=io.BytesIO(plain), file_type="glb", process=False,
                        resolver=trimesh.resolvers.FilePathResolver(str(path)))


def load_mesh(path: str | Path, max_faces: int, max_file_bytes: int,
              normalize_extent: float = 1.0, up_axis: str = "y") -> LoadedMesh:
    """``path`` flattened, validated, turned into the dataset's frame (``up_axis``, see
    :func:`frame_transform`), rid of the scenery around the object (:func:`drop_scenery`)
    and normalized."""
    path = Path(path)
    frame = frame_transform(path, up_axis)
    check_file(path, max_file_bytes)
    preflight(path, max_faces)
    try:
        loaded = load_scene(path, max_faces)
    except MeshError:
        raise
    except Exception as e:  # noqa: BLE001 - any loader failure is an input problem
        raise MeshError("unreadable", f"{type(e).__name__}: {e}"[:500]) from e
    parts = _flatten(loaded)
    if not parts:
        raise MeshError("empty", "no triangle geometry found in the file")
    if not np.array_equal(frame, np.eye(4)):
        for p in parts:
            p.apply_transform(frame)
    num_faces = sum(len(p.faces) for p in parts)
    if num_faces > max_faces:
        raise MeshError("too_many_faces", f"{num_faces} faces > max_faces={max_faces}")
    for p in parts:
        v = np.asarray(p.vertices)
        if not np.isfinite(v).all():
            raise MeshError("nonfinite_vertices", f"{int((~np.isfinite(v)).any(1).sum())} vertices are NaN/Inf")
        f = np.asarray(p.faces)
        if f.size and (f.min() < 0 or f.max() >= len(v)):
            raise MeshError("invalid_faces", f"face index out of range [0, {len(v)})")
    parts, notes = drop_scenery(parts)
    vertices = np.concatenate([np.asarray(p.vertices, np.float64) for p in parts])
    offsets = np.cumsum([0] + [len(p.vertices) for p in parts])[:-1]
    faces = np.concatenate([np.asarray(p.faces, np.int64) + o for p, o in zip(parts, offsets)])
    # Only referenced vertices define the extent (stray unreferenced points are common).
    used = vertices[np.unique(faces)]
    with np.errstate(over="ignore", invalid="ignore"):
        extent = used.max(0) - used.min(0)
    if not np.isfinite(extent).all():
        raise MeshError("nonfinite_vertices", f"the bounding box extent {extent.tolist()} overflows "
                                              "float64 (coordinates near +-1.8e308)")
    if not float(extent.max()) > 1e-9:
        raise MeshError("degenerate", f"bounding box extent {extent.tolist()} is zero")
    normalize = normalization_transform(used, normalize_extent)
    scale = normalize[0, 0]
    vertices = vertices * scale + normalize[:3, 3]
    tri = vertices[faces]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1).sum()
    if not area > 1e-10:
        raise MeshError("degenerate", f"total surface area {area:.3g} is zero after normalization")
    for p in parts:
        p.apply_transform(normalize)
    face_part = np.concatenate([np.full(len(p.faces), i, np.int64) for i, p in enumerate(parts)])
    face_offset = np.cumsum([0] + [len(p.faces) for p in parts])[:-1].astype(np.int64)
    return LoadedMesh(parts=parts, vertices=vertices, faces=faces, face_part=face_part,
                      face_offset=face_offset, transform=normalize @ frame, notes=notes)
