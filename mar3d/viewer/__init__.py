"""Shapes you can turn: self-contained HTML pages of rotatable 3D views.

A page is a list of :class:`Panel` s: an object's input image, its shapes (a generated
mesh, its ground truth as surface points), a caption with its scores, or the error that
left it without a shape. Each shape is a Plotly ``Mesh3d`` (meshes) or ``Scatter3d``
(points) in its own view; the views of one panel share their camera, so dragging one
turns them all. Plotly's JavaScript is inlined from the installed ``plotly`` wheel: the
page works offline, from a file, inside MLflow's artifact view, and needs no server.

Pages stay fast with many shapes: meshes are decimated for display only (vertex
clustering to at most ``max_faces`` faces; the stored meshes are untouched), points
are subsampled, panels are paged, and a view is drawn only while it is on screen (a
browser holds ~16 WebGL contexts; off-screen views give theirs back).
"""
from __future__ import annotations

import base64
import html
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mar3d import storage

DISPLAY_FACES = 3000     # per mesh on a page (decimated for display, not for storage)
DISPLAY_POINTS = 2048    # per point cloud on a page
PAGE_SIZE = 12           # panels per page
IMAGE_SIZE = 160         # longest side of an input image on a page, in pixels
MESH_SUFFIXES = (".glb", ".gltf", ".obj", ".ply", ".stl", ".off")


@dataclass
class Shape:
    """One rotatable view: a mesh (``faces`` given) or a point cloud."""
    label: str
    vertices: np.ndarray                  # [V, 3] float32, as displayed
    faces: np.ndarray | None = None       # [F, 3] int32, as displayed; None: points
    source_count: int = 0                 # faces (mesh) or points before display reduction


@dataclass
class Panel:
    """One object on a page."""
    title: str
    caption: str = ""
    image: np.ndarray | None = None       # input image, uint8 [H, W, 3|4]
    shapes: list[Shape] = field(default_factory=list)
    error: str | None = None              # why there is no shape (listed with its reason)


@dataclass
class PageInfo:
    path: Path | str
    bytes: int
    panels: int
    shapes: int


def _face_keys(faces: np.ndarray) -> np.ndarray:
    """One integer per face (its vertex indices as digits), so that repeated faces are
    found by a 1-D ``np.unique``: row-wise ``np.unique(axis=0)`` was ~10x slower."""
    base = int(faces.max(initial=0)) + 1
    if base ** 3 >= 2 ** 63:  # too many vertices for one int64: compare rows
        return np.unique(faces, axis=0, return_inverse=True)[1].reshape(-1)
    return (faces[:, 0] * base + faces[:, 1]) * base + faces[:, 2]


def decimate(vertices: np.ndarray, faces: np.ndarray, max_faces: int = DISPLAY_FACES
             ) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_faces`` faces by vertex clustering: vertices merged per cell of the
    finest cubic grid over the bounding box that leaves few enough faces (the grid found
    by bisection), collapsed and repeated faces dropped. For display: it keeps the
    silhouette and loses detail below one cell, and is not watertight-preserving."""
    if max_faces < 1:
        raise ValueError(f"max_faces must be >= 1, got {max_faces}")
    vertices = np.asarray(vertices, np.float64)
    faces = np.asarray(faces, np.int64)
    if len(faces) <= max_faces:
        return vertices.astype(np.float32), faces.astype(np.int32)
    lo, extent = vertices.min(0), np.maximum(np.ptp(vertices, 0).max(), 1e-12)
    unit = (vertices - lo) / extent

    def cluster(cells: int) -> tuple[np.ndarray, np.ndarray]:
        keys = np.minimum((unit * cells).astype(np.int64), cells - 1)
        _, inverse = np.unique(keys[:, 0] * (cells + 1) ** 2 + keys[:, 1] * (cells + 1) + keys[:, 2],
                               return_inverse=True)
        merged = inverse.reshape(-1)[faces]
        keep = (merged[:, 0] != merged[:, 1]) & (merged[:, 1] != merged[:, 2]) & (merged[:, 0] != merged[:, 2])
        merged = merged[keep]
        _, first = np.unique(_face_keys(np.sort(merged, axis=1)), return_index=True)
        return inverse.reshape(-1), merged[np.sort(first)]

    low, high = 2, 1024
    best = cluster(low)
    while high - low > 1:
        middle = (low + high) // 2
        candidate = cluster(middle)
        if len(candidate[1]) <= max_faces:
            low, best = middle, candidate
        else:
            high = middle
    inverse, merged = best
    sums = np.zeros((inverse.max() + 1, 3))
    np.add.at(sums, inverse, vertices)
    centroids = sums / np.bincount(inverse)[:, None]
    used, remapped = np.unique(merged, return_inverse=True)
    return centroids[used].astype(np.float32), remapped.reshape(-1, 3).astype(np.int32)


def mesh_shape(mesh, label: str = "mesh", max_faces: int = DISPLAY_FACES) -> Shape:
    """A trimesh mesh as a displayed shape."""
    vertices, faces = decimate(mesh.vertices, mesh.faces, max_faces)
    return Shape(label, vertices, faces, source_count=len(mesh.faces))


def points_shape(points: np.ndarray, label: str = "points", max_points: int = DISPLAY_POINTS) -> Shape:
    """Points [N, >=3] (extra columns, e.g. normals, are ignored), evenly strided."""
    points = np.asarray(points)[:, :3]
    step = max(1, -(-len(points) // max_points))
    return Shape(label, points[::step].astype(np.float32), None, source_count=len(points))


def image_data_url(image: np.ndarray, size: int = IMAGE_SIZE) -> str:
    """A PNG ``data:`` URL of an image scaled to at most ``size`` pixels on its longest side."""
    from PIL import Image

    picture = Image.fromarray(np.asarray(image, np.uint8))
    picture.thumbnail((size, size))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()


def _shape_arrays(shape: Shape) -> dict:
    """The shape's arrays, compact: vertices quantized to 16 bits over their bounding box
    (1/65535 of its extent: far below a pixel), faces as 16-bit indices when they fit."""
    vertices = np.asarray(shape.vertices, np.float64).reshape(-1, 3)
    origin = vertices.min(0) if len(vertices) else np.zeros(3)
    scale = max(float(np.ptp(vertices, 0).max()) if len(vertices) else 0.0, 1e-12) / 65535
    doc = {"origin": origin.tolist(), "scale": scale,
           "vertices": _b64(np.rint((vertices - origin) / scale).astype("<u2")), "faces": None}
    if shape.faces is not None:
        wide = len(vertices) > 65536
        doc.update(faces=_b64(np.asarray(shape.faces).astype("<u4" if wide else "<u2")), wide=wide)
    return doc


def _panel_doc(panel: Panel) -> dict:
    """What the page needs to list a panel; its shapes' arrays go in a block of their own,
    read when the panel is first drawn (a page parses only what it shows)."""
    return {"title": panel.title, "caption": panel.caption, "error": panel.error,
            "image": image_data_url(panel.image) if panel.image is not None else None,
            "shapes": [{"label": s.label, "points": s.faces is None,
                        "count": int(len(s.vertices) if s.faces is None else len(s.faces)),
                        "source_count": int(s.source_count)} for s in panel.shapes]}


def page_html(panels: list[Panel], title: str, subtitle: str = "", up_axis: str = "y",
              page_size: int = PAGE_SIZE) -> str:
    """The page as one HTML document (Plotly's JavaScript inlined)."""
    from plotly.offline import get_plotlyjs

    if up_axis not in ("y", "z"):
        raise ValueError(f"up_axis must be y or z, got {up_axis!r}")
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    meta = {"title": title, "subtitle": subtitle, "up_axis": up_axis, "page_size": page_size,
            "panels": [_panel_doc(p) for p in panels]}
    blocks = "\n".join(
        f'<script type="application/json" id="mar3d-shapes-{i}">'
        f'{json.dumps([_shape_arrays(s) for s in p.shapes], separators=(",", ":"))}</script>'
        for i, p in enumerate(panels) if p.shapes)
    # "</" would end an inline script early; "<\/" in JSON is the same string.
    values = {"__TITLE__": html.escape(title),
              "/*__PLOTLY__*/": get_plotlyjs().replace("</script", "<\\/script"),
              "__DATA__": json.dumps(meta, separators=(",", ":")).replace("</", "<\\/"),
              "<!--__SHAPES__-->": blocks}
    template = (Path(__file__).parent / "page.html").read_text()
    # One pass: what is put in is not searched for placeholders again.
    return re.sub("|".join(map(re.escape, values)), lambda m: values[m.group(0)], template)


def write_page(panels: list[Panel], location: str | Path, title: str, subtitle: str = "",
               up_axis: str = "y", page_size: int = PAGE_SIZE) -> PageInfo:
    """Write :func:`page_html` to a local path or an object-storage URI."""
    document = page_html(panels, title, subtitle, up_axis, page_size).encode()
    storage.write_bytes(location, document)
    return PageInfo(location, len(document), len(panels), sum(len(p.shapes) for p in panels))


def mesh_files(target: str | Path) -> list[Path]:
    """The mesh files a target names: the file itself, or every mesh under a folder
    (recursive, sorted). Refused: anything else, and a folder without meshes."""
    target = Path(target)
    if target.is_file():
        if target.suffix.lower() not in MESH_SUFFIXES:
            raise ValueError(f"{target} is not a mesh file (expected one of {', '.join(MESH_SUFFIXES)})")
        return [target]
    if not target.is_dir():
        raise FileNotFoundError(f"{target} does not exist")
    found = sorted(p for p in target.rglob("*") if p.suffix.lower() in MESH_SUFFIXES and p.is_file())
    if not found:
        raise ValueError(f"{target} holds no mesh files ({', '.join(MESH_SUFFIXES)})")
    return found


def write_mesh_page(target: str | Path, location: str | Path, up_axis: str = "y",
                    max_faces: int = DISPLAY_FACES, progress: bool = False) -> PageInfo:
    """A page of the meshes of ``target`` (a mesh file or a folder of them); a file that
    does not load as a mesh is listed with its reason."""
    import trimesh

    from mar3d.logs import progress_bar

    root = Path(target) if Path(target).is_dir() else Path(target).parent
    files = mesh_files(target)
    panels = []
    bar = progress_bar(len(files), "view", "mesh", enabled=progress)
    for path in files:
        name = path.relative_to(root).as_posix()
        try:
            mesh = trimesh.load(path, force="mesh")
            if len(mesh.faces) == 0:
                raise ValueError("it has no faces")
            panels.append(Panel(name, f"{len(mesh.vertices):,} vertices, {len(mesh.faces):,} faces",
                                shapes=[mesh_shape(mesh, "mesh", max_faces)]))
        except Exception as e:  # noqa: BLE001 - listed on the page with its reason
            panels.append(Panel(name, error=f"not shown: {type(e).__name__}: {e}"))
        bar.update(1)
    bar.close()
    return write_page(panels, location, title=f"meshes: {Path(target).absolute()}",
                      subtitle=f"{len(files)} files", up_axis=up_axis)
