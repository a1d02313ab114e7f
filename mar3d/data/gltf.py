"""glTF / GLB files as they really come, made plain for trimesh.

trimesh reads the plain form of glTF well (float accessors, triangle lists), but the
files people publish are often compressed or quantized, and trimesh then returns
zeros or garbage without raising: Draco primitives come out as a zero-extent mesh
(when no decoder is importable), sparse accessors as zeros, KHR_mesh_quantization integers undivided, triangle fans
not at all. :func:`as_plain_glb` rewrites such a file in memory into the plain form
(Draco decoded, integers dequantized, sparse applied, strips and fans listed as
triangles) and leaves materials, textures and the scene graph to trimesh. A file that
needs none of it returns ``None`` and loads exactly as before.

Every required extension that neither this module nor trimesh implements is refused
with ``MeshError("unsupported_extension")`` naming it, instead of loading a wrong mesh.
"""
from __future__ import annotations

import base64
import copy
import json
import struct
from pathlib import Path
from urllib.parse import unquote_to_bytes

import numpy as np

from .errors import MeshError
from .gltf_arrays import (FLOAT, TYPE_WIDTHS, BinaryBuilder, Values, as_float, component_dtype, decode_accessor,
                          drop_degenerate, fan_triangles, index_values, strip_triangles, type_width,
                          view_bytes)
from .preflight import check_reference

GLTF_SUFFIXES = (".glb", ".gltf")
DRACO = "KHR_draco_mesh_compression"
QUANTIZATION = "KHR_mesh_quantization"
# Decoded here into plain accessors, so the rewritten file no longer uses them.
DECODED_EXTENSIONS = frozenset({DRACO, QUANTIZATION})
# Implemented by trimesh's own glTF reader (trimesh/exchange/gltf/extensions.py).
TRIMESH_EXTENSIONS = frozenset({"KHR_materials_pbrSpecularGlossiness", "EXT_texture_webp"})
SUPPORTED_REQUIRED = DECODED_EXTENSIONS | TRIMESH_EXTENSIONS

TRIANGLES, STRIP, FAN = 4, 5, 6
POINTS = 0  # what a primitive without a single triangle becomes: the flattening drops it
# Attributes whose values are geometry: the spec reads them as floats whatever they are
# stored as (KHR_mesh_quantization allows integers, normalized or not).
_FLOAT_ATTRIBUTES = ("POSITION", "NORMAL", "TANGENT")
# Components a triangle's vertices carry at most in practice (3 corners x position,
# normal, tangent, 2 UVs, colour) plus its 3 indices, rounded up generously.
_BUFFERLESS_COMPONENTS_PER_FACE = 64
_GLB_MAGIC, _JSON_CHUNK, _BIN_CHUNK = b"glTF", 0x4E4F534A, 0x004E4942


def as_plain_glb(path: Path, max_faces: int) -> bytes | None:
    """The GLB bytes trimesh should read instead of ``path``, or ``None`` when the file is
    plain already. Raises :class:`MeshError` for unsupported or malformed files."""
    doc = read_document(path)
    check_required_extensions(doc)
    check_bufferless_sizes(doc, max_faces)
    if not needs_rewrite(doc):
        return None
    plain, binary = rewrite(doc, load_buffers(path, doc), max_faces)
    return glb_bytes(plain, binary)


def check_required_extensions(doc: dict) -> None:
    required = _list(doc.get("extensionsRequired"))
    unsupported = [str(name) for name in required
                   if not (isinstance(name, str) and name in SUPPORTED_REQUIRED)]
    if unsupported:
        raise MeshError("unsupported_extension",
                        f"{', '.join(unsupported)}: the file requires this glTF extension and the "
                        f"loader does not implement it (it does: {', '.join(sorted(SUPPORTED_REQUIRED))})")


def check_bufferless_sizes(doc: dict, max_faces: int) -> None:
    """Accessors without a bufferView (Draco placeholders, sparse bases, zeros) are
    allocated at their declared count, which costs nothing in the file: bound them by
    what ``max_faces`` triangles can use, before anything (trimesh included) allocates."""
    total = 0
    for index, accessor in enumerate(_list(doc.get("accessors"))):
        if not isinstance(accessor, dict) or "bufferView" in accessor:
            continue
        count = accessor.get("count")
        count = count if isinstance(count, int) else 0
        if count > 3 * max_faces:
            raise MeshError("too_many_faces", f"glTF accessor {index} declares {count} elements without "
                                              f"data, more than the {3 * max_faces} vertices "
                                              f"max_faces={max_faces} triangles can use")
        total += count * TYPE_WIDTHS.get(accessor.get("type"), 16)
    if total > _BUFFERLESS_COMPONENTS_PER_FACE * max_faces:
        raise MeshError("too_many_faces", f"glTF accessors without data declare {total} components, more "
                                          f"than {_BUFFERLESS_COMPONENTS_PER_FACE} per face of max_faces")


def needs_rewrite(doc: dict) -> bool:
    """Whether trimesh would misread the file: Draco, sparse, integer geometry, strip/fan.
    Tolerant of malformed documents: those are left to trimesh, as before."""
    accessors = _list(doc.get("accessors"))
    if any(isinstance(a, dict) and "sparse" in a for a in accessors):
        return True
    for prim in primitives(doc):
        if DRACO in _dict(prim.get("extensions")) or prim.get("mode", TRIANGLES) in (STRIP, FAN):
            return True
    for index in float_attribute_accessors(doc):
        accessor = accessors[index] if isinstance(index, int) and 0 <= index < len(accessors) else {}
        if isinstance(accessor, dict) and accessor.get("componentType", FLOAT) != FLOAT:
            return True
    return False


# ----------------------------------------------------------------------- the rewrite
def rewrite(doc: dict, buffers: list[bytes], max_faces: int) -> tuple[dict, bytes]:
    """The plain equivalent of ``doc``: one buffer, every accessor packed (geometry as
    float32), Draco decoded, strips and fans as triangle lists."""
    plain = copy.deepcopy(doc)
    builder = BinaryBuilder()
    # The original views stay where they were (moved into the one buffer), so images
    # and anything else that points at a view by index keep working.
    starts = [builder.append(b) for b in buffers]
    builder.views = [_moved_view(view, starts) for view in _list(doc.get("bufferViews"))]
    decoded = plain_accessors(doc, buffers, builder)
    for prim in primitives(plain):
        if DRACO in _dict(prim.get("extensions")):
            decode_draco_primitive(prim, doc, buffers, builder, max_faces)
        if prim.get("mode", TRIANGLES) in (STRIP, FAN):
            list_triangles(prim, decoded, builder)
    plain["accessors"] = builder.accessors
    plain["bufferViews"] = builder.views
    plain["buffers"] = [{"byteLength": builder.size}]
    _drop_decoded_extensions(plain)
    return plain, builder.bytes()


def plain_accessors(doc: dict, buffers: list[bytes], builder: BinaryBuilder) -> list[Values]:
    """Every accessor decoded and re-added to ``builder.accessors`` at the same index."""
    floats = float_attribute_accessors(doc)
    positions = {prim["attributes"]["POSITION"] for prim in primitives(doc)
                 if "POSITION" in _dict(prim.get("attributes"))}
    decoded = []
    for index in range(len(_list(doc.get("accessors")))):
        values = decode_accessor(doc, buffers, index)
        if index in floats:
            values = as_float(values)
        builder.add_accessor(values, with_bounds=index in positions)
        decoded.append(values)
    return decoded


def list_triangles(prim: dict, decoded: list[Values], builder: BinaryBuilder) -> None:
    """Turn a strip or fan primitive into a triangle list (in place)."""
    if "indices" in prim:
        order = decoded[prim["indices"]].data[:, 0].astype(np.int64)
    else:  # drawn in vertex order
        order = np.arange(len(decoded[prim["attributes"]["POSITION"]].data))
    convert = strip_triangles if prim["mode"] == STRIP else fan_triangles
    _set_triangles(prim, drop_degenerate(convert(order)), builder)


def decode_draco_primitive(prim: dict, doc: dict, buffers: list[bytes], builder: BinaryBuilder,
                           max_faces: int) -> None:
    """Replace a KHR_draco_mesh_compression primitive's accessors by the decoded data.

    The extension maps glTF attribute names to Draco attribute ids; the primitive's own
    accessors only declare the decoded type (their data, if any, is a fallback). Decoded
    here rather than by trimesh's own handler (trimesh >= 5 only, and only when DracoPy
    imports) so the face limit applies before the data is used and every version agrees."""
    extension = prim["extensions"].pop(DRACO)
    if not prim["extensions"]:
        del prim["extensions"]
    mesh = draco_decode(bytes(view_bytes(doc, buffers, extension.get("bufferView"))))
    faces = getattr(mesh, "faces", None)  # a Draco point cloud has none
    faces = np.zeros((0, 3), np.uint32) if faces is None else np.asarray(faces).reshape(-1, 3)
    if len(faces) > max_faces:
        raise MeshError("too_many_faces", f"a Draco primitive decodes to {len(faces)} triangles > "
                                          f"max_faces={max_faces}")
    attributes = prim["attributes"]
    for name, unique_id in _dict(extension.get("attributes")).items():
        if name not in attributes:
            continue  # compressed but unused by the primitive
        attribute = mesh.get_attribute_by_unique_id(unique_id)
        if attribute is None:
            raise MeshError("unreadable", f"glTF: the Draco data of {name} (id {unique_id}) is missing")
        values = draco_values(attribute["data"], doc["accessors"][attributes[name]], name)
        if _is_float_attribute(name):
            values = as_float(values)
        attributes[name] = builder.add_accessor(values, with_bounds=name == "POSITION")
    prim.pop("indices", None)
    _set_triangles(prim, faces, builder)


def draco_decode(blob: bytes):
    import DracoPy  # imported here: only Draco files need the native library

    try:
        return DracoPy.decode(blob)
    except Exception as e:  # noqa: BLE001 - any decoder failure is a corrupt input
        raise MeshError("unreadable", f"glTF: {DRACO} data does not decode: {type(e).__name__}: {e}"[:500]) from e


def draco_values(data: np.ndarray, declared: dict, name: str) -> Values:
    """Decoded Draco data typed by the accessor that declares it (spec of the extension:
    the accessor's componentType / normalized describe the decoded values)."""
    data = np.asarray(data)
    data = data.reshape(len(data), -1)
    width = type_width(declared.get("type"))
    if data.shape[1] != width:
        raise MeshError("unreadable", f"glTF: Draco {name} has {data.shape[1]} components, its "
                                      f"accessor declares {declared.get('type')}")
    if data.dtype.kind == "f":  # Draco dequantized it already
        return Values(data.astype(np.float32), FLOAT, False, declared["type"])
    component_type = declared.get("componentType")
    return Values(data.astype(component_dtype(component_type)), component_type,
                  bool(declared.get("normalized")), declared["type"])


def _set_triangles(prim: dict, triangles: np.ndarray, builder: BinaryBuilder) -> None:
    if len(triangles):
        prim["mode"] = TRIANGLES
        prim["indices"] = builder.add_accessor(index_values(triangles))
    else:
        prim["mode"] = POINTS
        prim.pop("indices", None)


def _moved_view(view: dict, starts: list[int]) -> dict:
    moved = dict(view)
    buffer = view.get("buffer")
    if not isinstance(buffer, int) or not 0 <= buffer < len(starts):
        raise MeshError("unreadable", f"glTF: a bufferView names buffer {buffer!r}, which does not exist")
    moved["buffer"] = 0
    moved["byteOffset"] = starts[buffer] + int(view.get("byteOffset", 0))
    return moved


def _drop_decoded_extensions(doc: dict) -> None:
    for key in ("extensionsUsed", "extensionsRequired"):
        kept = [name for name in _list(doc.get(key)) if name not in DECODED_EXTENSIONS]
        if kept:
            doc[key] = kept
        else:
            doc.pop(key, None)


# ------------------------------------------------------------------ document helpers
def primitives(doc: dict):
    for mesh in _list(doc.get("meshes")):
        for prim in _list(_dict(mesh).get("primitives")):
            if isinstance(prim, dict):
                yield prim


def float_attribute_accessors(doc: dict) -> set:
    """Accessors read as geometry by some primitive or morph target."""
    found = set()
    for prim in primitives(doc):
        for attributes in [prim.get("attributes")] + _list(prim.get("targets")):
            found.update(index for name, index in _dict(attributes).items()
                         if _is_float_attribute(name) and isinstance(index, int))
    return found


def _is_float_attribute(name: str) -> bool:
    return name in _FLOAT_ATTRIBUTES or name.startswith("TEXCOORD_")


def _list(value) -> list:
    return value if isinstance(value, list) else []


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


# ------------------------------------------------------------------------ containers
def read_document(path: Path) -> dict:
    """The glTF JSON of a .gltf file or of a GLB's first chunk."""
    try:
        if path.suffix.lower() == ".gltf":
            doc = json.loads(path.read_bytes())
        else:
            doc = json.loads(_glb_chunks(path, with_binary=False)[0])
    except (ValueError, UnicodeDecodeError) as e:
        raise MeshError("unreadable", f"glTF: the JSON does not parse: {e}"[:500]) from e
    if not isinstance(doc, dict):
        raise MeshError("unreadable", "glTF: the JSON is not an object")
    return doc


def load_buffers(path: Path, doc: dict) -> list[bytes]:
    """The bytes of every buffer: the GLB binary chunk, ``data:`` URIs, or files beside
    ``path`` (checked to stay inside its folder, as preflight does)."""
    binary = _glb_chunks(path, with_binary=True)[1] if path.suffix.lower() == ".glb" else None
    buffers = []
    for i, buffer in enumerate(_list(doc.get("buffers"))):
        uri = _dict(buffer).get("uri")
        if isinstance(uri, str):
            data = _uri_bytes(path, uri, f"glTF buffers[{i}].uri")
        elif i == 0 and binary is not None:  # GLB: the first buffer without a uri is the chunk
            data = binary
        else:
            raise MeshError("unreadable", f"glTF: buffers[{i}] has no uri and is not the GLB binary chunk")
        declared = int(_dict(buffer).get("byteLength", 0))
        if len(data) < declared:
            raise MeshError("unreadable", f"glTF: buffers[{i}] has {len(data)} bytes, declares {declared}")
        buffers.append(data)
    return buffers


def _uri_bytes(path: Path, uri: str, what: str) -> bytes:
    if uri.startswith("data:"):
        header, _, payload = uri.partition(",")
        return base64.b64decode(payload) if header.endswith(";base64") else unquote_to_bytes(payload)
    check_reference(path, uri, what)
    name = unquote_to_bytes(uri).decode("utf-8", "replace")  # glTF URIs are percent-encoded
    check_reference(path, name, what)
    target = path.parent / name
    if not target.is_file():
        raise MeshError("unreadable", f"{what} {uri!r}: {target} does not exist")
    return target.read_bytes()


def _glb_chunks(path: Path, with_binary: bool) -> tuple[bytes, bytes | None]:
    """(JSON chunk, binary chunk or None) of a GLB; the binary one only when asked."""
    with open(path, "rb") as f:
        head = f.read(20)
        if len(head) < 20 or head[:4] != _GLB_MAGIC:
            raise MeshError("unreadable", "glTF: not a GLB file (no 'glTF' magic)")
        version, _total, json_length, kind = struct.unpack("<IIII", head[4:20])
        if version != 2 or kind != _JSON_CHUNK:
            raise MeshError("unreadable", f"glTF: GLB version {version} / first chunk {kind:#x} "
                                          "is not glTF 2.0 JSON")
        text = f.read(json_length)
        binary = None
        if with_binary:
            chunk = f.read(8)
            if len(chunk) == 8:
                length, kind = struct.unpack("<II", chunk)
                binary = f.read(length) if kind == _BIN_CHUNK else None
                if binary is not None and len(binary) != length:
                    raise MeshError("unreadable", f"glTF: the GLB binary chunk is truncated "
                                                  f"({len(binary)} of {length} bytes)")
    return text, binary


def glb_bytes(doc: dict, binary: bytes) -> bytes:
    """A GLB container: JSON chunk padded with spaces, binary chunk with zeros (spec 4.4)."""
    text = json.dumps(doc, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 4)
    binary += b"\0" * (-len(binary) % 4)
    chunks = struct.pack("<II", len(text), _JSON_CHUNK) + text
    if binary:
        chunks += struct.pack("<II", len(binary), _BIN_CHUNK) + binary
    return _GLB_MAGIC + struct.pack("<II", 2, 12 + len(chunks)) + chunks
