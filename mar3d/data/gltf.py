"""glTF / GLB files as they really come, made plain for trimesh.

trimesh reads the plain form of glTF well (float accessors, triangle lists), but the
files people publish are often compressed or quantized, and trimesh then returns
zeros or garbage without raising: Draco primitives come out as a zero-extent mesh
(when no decoder is importable), sparse accessors as zeros, KHR_mesh_quantization integers undivided, triangle fans
not at all. Materials have the same problem: trimesh turns a specular-glossiness
material into a metallic one through a conversion that reads a palette ("P") diffuse
texture as grey, and it reads every texture through TEXCOORD_0 untransformed (a base
colour texture on TEXCOORD_1, or with KHR_texture_transform, comes out scrambled).
:func:`as_plain_glb` rewrites such a file in memory into the plain form (Draco and
meshopt-compressed buffer views decoded, integers dequantized, sparse applied, strips and fans listed as triangles,
specular-glossiness written as the metallic-roughness material of its diffuse colour,
the base colour texture's coordinates baked into TEXCOORD_0) and leaves the rest of
the materials, the textures and the scene graph to trimesh. A file that needs none of
it returns ``None`` and loads exactly as before.

Every required extension that neither this module nor trimesh implements is refused
with ``MeshError("unsupported_extension")`` naming it, instead of loading a wrong mesh.
(Alpha modes and vertex colours under a material are read by trimesh as they are and
drawn by the renderer, :mod:`mar3d.data.render`.)

(About 590 lines on purpose: one rewrite of one file format, each case a small
function beside the accessor code it shares.)
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
from .gltf_arrays import (FLOAT, TYPE_WIDTHS, UINT16, BinaryBuilder, Values, as_float, component_dtype,
                          decode_accessor, drop_degenerate, fan_triangles, index_values, strip_triangles,
                          type_width, view_bytes)
from .preflight import check_reference

GLTF_SUFFIXES = (".glb", ".gltf")
DRACO = "KHR_draco_mesh_compression"
# Compressed bufferViews (gltfpack, gltf-transform, Blender exporters with meshopt): the
# EXT_ name is the original, the KHR_ one its ratified successor with the same layout.
MESHOPT = ("EXT_meshopt_compression", "KHR_meshopt_compression")
MESHOPT_MODES = ("ATTRIBUTES", "TRIANGLES", "INDICES")
MESHOPT_FILTERS = ("NONE", "OCTAHEDRAL", "QUATERNION", "EXPONENTIAL", "COLOR")
QUANTIZATION = "KHR_mesh_quantization"
SPEC_GLOSS = "KHR_materials_pbrSpecularGlossiness"
TEXTURE_TRANSFORM = "KHR_texture_transform"
# Decoded here into plain accessors and materials, so the rewritten file no longer uses
# them (a texture transform is baked for the base colour texture, the only one rendered).
DECODED_EXTENSIONS = frozenset({DRACO, *MESHOPT, QUANTIZATION, SPEC_GLOSS, TEXTURE_TRANSFORM})
# Implemented by trimesh's own glTF reader (trimesh/exchange/gltf/extensions.py).
TRIMESH_EXTENSIONS = frozenset({"EXT_texture_webp"})
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
    doc, buffers = decode_meshopt_views(doc, load_buffers(path, doc), max_faces)
    plain, binary = rewrite(doc, buffers, max_faces)
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
    """Whether trimesh would misread the file: Draco, sparse, integer geometry, 16-bit
    colours, strip/fan, specular-glossiness, a base colour texture on other coordinates
    than plain TEXCOORD_0. Tolerant of malformed documents: those are left to trimesh."""
    accessors = _list(doc.get("accessors"))
    if any(isinstance(a, dict) and "sparse" in a for a in accessors):
        return True
    if any(meshopt_extension(view) is not None for view in _list(doc.get("bufferViews"))):
        return True
    if any(SPEC_GLOSS in _dict(m.get("extensions")) for m in materials(doc)):
        return True
    for prim in primitives(doc):
        if DRACO in _dict(prim.get("extensions")) or prim.get("mode", TRIANGLES) in (STRIP, FAN):
            return True
        info = base_color_texture(doc, prim)
        if info is not None and _reads_other_coordinates(info):
            return True
    if wide_color_accessors(doc):
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
    for material in materials(plain):
        if SPEC_GLOSS in _dict(material.get("extensions")):
            metal_rough_from_spec_gloss(material)
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
    bake_base_color_coordinates(plain, builder)
    plain["accessors"] = builder.accessors
    plain["bufferViews"] = builder.views
    plain["buffers"] = [{"byteLength": builder.size}]
    _drop_decoded_extensions(plain)
    return plain, builder.bytes()


def meshopt_extension(view) -> dict | None:
    extensions = _dict(_dict(view).get("extensions"))
    return next((_dict(extensions[name]) for name in MESHOPT if name in extensions), None)


def is_meshopt_fallback(buffer) -> bool:
    """A buffer that only stands in for meshopt-compressed views: no data of its own."""
    extensions = _dict(_dict(buffer).get("extensions"))
    return any(_dict(extensions.get(name)).get("fallback") is True for name in MESHOPT)


def decode_meshopt_views(doc: dict, buffers: list[bytes], max_faces: int) -> tuple[dict, list[bytes]]:
    """``doc`` and ``buffers`` with every EXT/KHR_meshopt_compression bufferView decoded
    into a plain view of a new buffer (meshoptimizer's own decoder, filters included);
    unchanged when no view is compressed. Compressed data is bounded by what
    ``max_faces`` triangles can use before it is decoded."""
    views = _list(doc.get("bufferViews"))
    if not any(meshopt_extension(view) is not None for view in views):
        return doc, buffers
    import meshopt  # imported here: only meshopt files need the native decoder

    doc, buffers = copy.deepcopy(doc), list(buffers)
    for index, view in enumerate(doc["bufferViews"]):
        extension = meshopt_extension(view)
        if extension is None:
            continue
        what = f"glTF bufferViews[{index}] (meshopt)"
        count, stride = extension.get("count"), extension.get("byteStride")
        mode, filter_ = extension.get("mode"), extension.get("filter", "NONE")
        if not (isinstance(count, int) and isinstance(stride, int) and count > 0 and 0 < stride <= 256):
            raise MeshError("unreadable", f"{what}: count {count!r} / byteStride {stride!r} are not valid")
        if mode not in MESHOPT_MODES or filter_ not in MESHOPT_FILTERS:
            raise MeshError("unsupported_extension", f"{what}: mode {mode!r} / filter {filter_!r} is not one "
                                                     f"of {MESHOPT_MODES} / {MESHOPT_FILTERS}")
        if count * stride > _BUFFERLESS_COMPONENTS_PER_FACE * 4 * max_faces:
            raise MeshError("too_many_faces", f"{what} decodes to {count * stride} bytes, more than "
                                              f"max_faces={max_faces} triangles can use")
        source = bytes(view_bytes({"bufferViews": [extension]}, buffers, 0))
        try:
            rows = meshopt.decode_gltf_buffer(source, count, stride, mode, filter_)
        except (ValueError, RuntimeError) as e:
            raise MeshError("unreadable", f"{what}: the compressed data does not decode ({e})") from None
        plain = np.ascontiguousarray(rows).tobytes()
        length = view.get("byteLength")
        if not isinstance(length, int) or not 0 <= length <= len(plain):
            raise MeshError("unreadable", f"{what}: byteLength {length!r} exceeds the {len(plain)} "
                                          "bytes its data decodes to")
        buffers.append(plain)
        decoded = {k: v for k, v in view.items() if k != "extensions"}
        others = {k: v for k, v in _dict(view.get("extensions")).items() if k not in MESHOPT}
        if others:
            decoded["extensions"] = others
        decoded.update(buffer=len(buffers) - 1, byteOffset=0)
        doc["bufferViews"][index] = decoded
    fallbacks = {i for i, buffer in enumerate(_list(doc.get("buffers"))) if is_meshopt_fallback(buffer)}
    reading = sorted(i for i, view in enumerate(doc["bufferViews"]) if _dict(view).get("buffer") in fallbacks)
    if reading:
        raise MeshError("unreadable", f"glTF bufferViews {reading} read a meshopt fallback buffer, which "
                                      "holds no data, without being compressed themselves")
    return doc, buffers


def plain_accessors(doc: dict, buffers: list[bytes], builder: BinaryBuilder) -> list[Values]:
    """Every accessor decoded and re-added to ``builder.accessors`` at the same index."""
    floats = float_attribute_accessors(doc) | wide_color_accessors(doc)
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
        if _is_float_attribute(name) or (name.startswith("COLOR_") and values.component_type == UINT16):
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


# ---------------------------------------------------------------------------- materials
def metal_rough_from_spec_gloss(material: dict) -> None:
    """Replace a KHR_materials_pbrSpecularGlossiness material (in place) by the
    metallic-roughness material of its diffuse colour: diffuseTexture and diffuseFactor
    become baseColorTexture and baseColorFactor (both are "the colour" the condition
    renders show), glossiness becomes roughness. trimesh's own conversion solves for a
    metallic factor from the specular colour, reads a palette diffuse texture by its
    palette indices (grey) and, with the default specularFactor of 1, loses the diffuse
    colour altogether. The extension's material replaces any fallback
    pbrMetallicRoughness, as in a viewer that implements it."""
    extensions = material["extensions"]
    spec_gloss = _dict(extensions.pop(SPEC_GLOSS))
    if not extensions:
        del material["extensions"]
    glossiness = spec_gloss.get("glossinessFactor", 1.0)
    pbr = {"baseColorFactor": spec_gloss.get("diffuseFactor", [1.0, 1.0, 1.0, 1.0]), "metallicFactor": 0.0,
           "roughnessFactor": 1.0 - glossiness if isinstance(glossiness, (int, float)) else 0.0}
    if isinstance(spec_gloss.get("diffuseTexture"), dict):
        pbr["baseColorTexture"] = spec_gloss["diffuseTexture"]
    material["pbrMetallicRoughness"] = pbr


def base_color_texture(doc: dict, prim: dict) -> dict | None:
    """The textureInfo of the base colour texture that ``prim``'s material draws with
    (the specular-glossiness diffuse texture where that extension is used), or None."""
    index = prim.get("material")
    all_materials = _list(doc.get("materials"))
    if not isinstance(index, int) or not 0 <= index < len(all_materials):
        return None
    material = _dict(all_materials[index])
    spec_gloss = _dict(_dict(material.get("extensions")).get(SPEC_GLOSS))
    info = spec_gloss.get("diffuseTexture") if spec_gloss else \
        _dict(material.get("pbrMetallicRoughness")).get("baseColorTexture")
    return info if isinstance(info, dict) else None


def texture_coordinates(info: dict) -> tuple[int, np.ndarray | None]:
    """(n of the TEXCOORD_n set a textureInfo samples, its KHR_texture_transform as a 3x3
    matrix on (u, v, 1), or None for none): the extension's texCoord overrides the
    textureInfo's (spec of the extension)."""
    transform = _dict(info.get("extensions")).get(TEXTURE_TRANSFORM)
    texcoord = info.get("texCoord", 0)
    if isinstance(transform, dict):
        texcoord = transform.get("texCoord", texcoord)
    if not isinstance(texcoord, int) or isinstance(texcoord, bool) or texcoord < 0:
        raise MeshError("unreadable", f"glTF: texCoord {texcoord!r} is not a texture coordinate set")
    if not isinstance(transform, dict):
        return texcoord, None
    matrix = uv_transform_matrix(transform)
    return texcoord, None if np.array_equal(matrix, np.eye(3)) else matrix


def uv_transform_matrix(transform: dict) -> np.ndarray:
    """KHR_texture_transform as one matrix: translation x rotation x scale on (u, v, 1),
    UVs in glTF's own frame (origin top left, v down). The rotation turns the UVs
    counter-clockwise, i.e. (u, v) -> (cos u + sin v, -sin u + cos v): the one reading under
    which the extension's example ("offset [0, 1], rotation pi/2, scale 0.5 uses only the
    lower left quadrant") holds and the glTF-Sample-Viewer's."""
    try:
        offset = np.asarray(transform.get("offset", [0.0, 0.0]), np.float64).reshape(2)
        scale = np.asarray(transform.get("scale", [1.0, 1.0]), np.float64).reshape(2)
        rotation = float(transform.get("rotation", 0.0))
    except (TypeError, ValueError) as e:
        raise MeshError("unreadable", f"glTF: {TEXTURE_TRANSFORM} {transform!r} is malformed: {e}"[:500]) from e
    if not (np.isfinite(offset).all() and np.isfinite(scale).all() and np.isfinite(rotation)):
        raise MeshError("unreadable", f"glTF: {TEXTURE_TRANSFORM} {transform!r} is not finite"[:500])
    c, s = np.cos(rotation), np.sin(rotation)
    translate = np.array([[1.0, 0.0, offset[0]], [0.0, 1.0, offset[1]], [0.0, 0.0, 1.0]])
    rotate = np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])
    return translate @ rotate @ np.diag([scale[0], scale[1], 1.0])


def transform_uvs(uv: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    return (np.asarray(uv, np.float64) @ matrix[:2, :2].T + matrix[:2, 2]).astype(np.float32)


def bake_base_color_coordinates(doc: dict, builder: BinaryBuilder) -> None:
    """Make TEXCOORD_0 of every primitive what its base colour texture samples (in place):
    the set its textureInfo names, with the texture transform applied. trimesh reads
    only TEXCOORD_0 and ignores transforms, and the renderer draws only the base colour,
    so after this the file renders as a viewer shows it (other textures, unrendered,
    may now read the wrong coordinates)."""
    baked: dict[tuple, int] = {}
    infos = []
    for prim in primitives(doc):
        info = base_color_texture(doc, prim)
        if info is None or not _reads_other_coordinates(info):
            continue
        texcoord, matrix = texture_coordinates(info)
        attributes = _dict(prim.get("attributes"))
        source = attributes.get(f"TEXCOORD_{texcoord}")
        if not isinstance(source, int) or not 0 <= source < len(builder.values) \
                or builder.values[source].data.shape[1:] != (2,):
            raise MeshError("unreadable", f"glTF: material {prim.get('material')} samples its base colour "
                                          f"texture at TEXCOORD_{texcoord}, which a primitive using it lacks")
        key = (source, None if matrix is None else matrix.tobytes())
        if key not in baked:
            uv = builder.values[source].data
            if matrix is not None:
                uv = transform_uvs(uv, matrix)
            baked[key] = builder.add_accessor(Values(np.asarray(uv, np.float32), FLOAT, False, "VEC2"))
        attributes["TEXCOORD_0"] = baked[key]
        infos.append(info)
    for info in infos:  # after every primitive: several may share a material
        info["texCoord"] = 0
        extensions = _dict(info.get("extensions"))
        extensions.pop(TEXTURE_TRANSFORM, None)
        if not extensions:
            info.pop("extensions", None)


def _reads_other_coordinates(info: dict) -> bool:
    extensions = _dict(info.get("extensions"))
    return info.get("texCoord", 0) != 0 or TEXTURE_TRANSFORM in extensions


def wide_color_accessors(doc: dict) -> set:
    """COLOR_n accessors of normalized uint16: trimesh clips them to uint8 instead of
    scaling (every channel above 255/65535 becomes 1.0), so they are made float here."""
    accessors = _list(doc.get("accessors"))
    found = set()
    for prim in primitives(doc):
        for name, index in _dict(prim.get("attributes")).items():
            if name.startswith("COLOR_") and isinstance(index, int) and 0 <= index < len(accessors) \
                    and _dict(accessors[index]).get("componentType") == UINT16:
                found.add(index)
    return found


# ------------------------------------------------------------------ document helpers
def primitives(doc: dict):
    for mesh in _list(doc.get("meshes")):
        for prim in _list(_dict(mesh).get("primitives")):
            if isinstance(prim, dict):
                yield prim


def materials(doc: dict):
    for material in _list(doc.get("materials")):
        if isinstance(material, dict):
            yield material


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
        if not isinstance(uri, str) and is_meshopt_fallback(buffer):
            buffers.append(b"")  # every view of it is compressed (decode_meshopt_views checks)
            continue
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
