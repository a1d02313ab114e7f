"""Cheap checks on a mesh file before the loader parses it.

The loader (trimesh) allocates the whole mesh before anything can be checked, and it
follows references to other files: OBJ ``mtllib`` and MTL texture maps, glTF buffer and
image URIs. So before loading, from headers only:

- the declared triangle count (binary PLY/STL headers, OFF counts, glTF accessors,
  OBJ ``f`` records) must fit ``max_faces``, so a 10M-face file is refused in
  milliseconds instead of after gigabytes of allocation;
- a binary STL must be exactly as long as its header says (the loader returns an empty
  mesh for truncated ones, which would hide the real problem);
- every referenced file must be a relative path inside the mesh's own folder (``data:``
  URIs are fine): no ``../`` traversal, absolute paths, ``file://`` or network URLs.

Each problem is a :class:`MeshError`; the exact checks still run after loading.
"""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from .errors import MeshError

_HEADER_LIMIT = 1 << 16  # bytes of header we are willing to read for PLY/OFF
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_MTL_MAP = re.compile(r"^\s*(map_\w+|bump|disp|decal|refl|norm)\s+(.+)$", re.IGNORECASE)


def preflight(path: Path, max_faces: int) -> None:
    """Raise :class:`MeshError` if ``path`` (already known to exist) must not be loaded."""
    suffix = path.suffix.lower()
    declared = None
    if suffix == ".ply":
        declared = _ply_faces(path)
    elif suffix == ".stl":
        declared = _stl_faces(path)
    elif suffix == ".off":
        declared = _off_faces(path)
    elif suffix in (".glb", ".gltf"):
        doc = _gltf_json(path)
        if doc is not None:
            check_gltf_references(path, doc)
            declared = _gltf_triangles(doc)
    elif suffix == ".obj":
        declared = _obj_scan(path)
    if declared is not None and declared > max_faces:
        raise MeshError("too_many_faces", f"the file declares {declared} triangles > max_faces={max_faces}")


def check_reference(mesh_path: Path, ref: str, what: str) -> None:
    """A referenced file must be a relative path resolving inside the mesh's folder."""
    ref = ref.strip()
    if ref.startswith("data:"):
        return
    if _URI_SCHEME.match(ref) or ref.startswith(("/", "\\")) or "\x00" in ref:
        raise MeshError("unsafe_reference", f"{what} {ref!r} is not a relative path inside the mesh folder")
    root = mesh_path.parent.resolve()
    target = (root / ref.replace("\\", "/")).resolve()
    if not target.is_relative_to(root):
        raise MeshError("unsafe_reference", f"{what} {ref!r} resolves to {target}, outside the mesh folder {root}")


# ---------------------------------------------------------------------------- formats
def _read_header(path: Path, end: bytes) -> str | None:
    with open(path, "rb") as f:
        head = f.read(_HEADER_LIMIT)
    i = head.find(end)
    return None if i < 0 else head[:i].decode("ascii", "replace")


def _ply_faces(path: Path) -> int | None:
    header = _read_header(path, b"end_header")
    if header is None:
        return None  # not a PLY header we understand: the loader reports it
    m = re.search(r"^element\s+face\s+(\d+)\s*$", header, re.MULTILINE)
    return int(m.group(1)) if m else None


def _stl_faces(path: Path) -> int | None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(84)
    if len(head) < 84:
        return None
    (count,) = struct.unpack("<I", head[80:84])
    if size == 84 + 50 * count:
        return count
    if head.lstrip()[:5].lower() == b"solid":
        return _count_lines(path, (b"facet",))  # ASCII STL: one 'facet normal' per triangle
    raise MeshError("unreadable", f"binary STL declares {count} triangles ({84 + 50 * count} bytes) "
                                  f"but the file has {size} bytes (truncated or not an STL)")


def _off_faces(path: Path) -> int | None:
    with open(path, "rb") as f:
        head = f.read(_HEADER_LIMIT).decode("ascii", "replace")
    tokens = [t for line in head.splitlines() if not line.lstrip().startswith("#") for t in line.split()]
    if not tokens or not tokens[0].endswith("OFF"):
        return None
    counts = tokens[1:3] if tokens[0] == "OFF" else []
    return int(counts[1]) if len(counts) == 2 and counts[1].isdigit() else None


def _count_lines(path: Path, prefixes: tuple[bytes, ...]) -> int:
    n = 0
    with open(path, "rb") as f:
        for line in f:
            if line.lstrip().startswith(prefixes):
                n += 1
    return n


def _obj_scan(path: Path) -> int:
    """Triangles declared by ``f`` records (an n-gon is n-2 triangles); checks every
    ``mtllib`` and the texture maps of the MTL files it names."""
    triangles = 0
    with open(path, "rb") as f:
        for raw in f:
            line = raw.lstrip()
            if line.startswith(b"f ") or line.startswith(b"f\t"):
                triangles += max(1, len(line.split()) - 3)
            elif line.startswith(b"mtllib"):
                for name in line.decode("utf-8", "replace").split()[1:]:
                    check_reference(path, name, "OBJ mtllib")
                    _check_mtl(path, path.parent / name)
    return triangles


def _check_mtl(obj_path: Path, mtl_path: Path) -> None:
    if not mtl_path.is_file():
        return  # a missing material is a warning in the loader, not a hazard
    with open(mtl_path, "rb") as f:
        for raw in f:
            m = _MTL_MAP.match(raw.decode("utf-8", "replace"))
            if m:
                # The file name is the last token (options such as -s 1 1 1 come first).
                check_reference(obj_path, m.group(2).split()[-1], f"MTL {m.group(1)} in {mtl_path.name}")


def _gltf_json(path: Path) -> dict | None:
    try:
        if path.suffix.lower() == ".gltf":
            doc = json.loads(path.read_bytes())
        else:
            with open(path, "rb") as f:
                head = f.read(20)
                if len(head) < 20 or head[:4] != b"glTF":
                    return None
                length, kind = struct.unpack("<II", head[12:20])
                if kind != 0x4E4F534A or length > path.stat().st_size:
                    return None
                doc = json.loads(f.read(length))
    except (ValueError, UnicodeDecodeError):
        return None  # malformed JSON: the loader raises and the job records 'unreadable'
    return doc if isinstance(doc, dict) else None


def check_gltf_references(path: Path, doc: dict) -> None:
    for kind in ("buffers", "images"):
        for i, item in enumerate(doc.get(kind) or []):
            uri = item.get("uri") if isinstance(item, dict) else None
            if isinstance(uri, str):
                check_reference(path, uri, f"glTF {kind}[{i}].uri")


def _gltf_triangles(doc: dict) -> int | None:
    accessors = doc.get("accessors") or []
    total = 0
    try:
        for mesh in doc.get("meshes") or []:
            for prim in mesh.get("primitives") or []:
                if prim.get("mode", 4) not in (4, 5, 6):
                    continue  # points and lines carry no triangles
                idx = prim.get("indices", prim.get("attributes", {}).get("POSITION"))
                if idx is not None:
                    count = int(accessors[idx]["count"])
                    # a strip or fan of n indices draws n - 2 triangles, a list n / 3
                    total += count // 3 if prim.get("mode", 4) == 4 else max(count - 2, 0)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return None  # inconsistent document: left to the loader
    # Every node instancing a mesh multiplies its triangles; the exact count after
    # flattening is checked after loading, this bound is per mesh definition.
    return total
