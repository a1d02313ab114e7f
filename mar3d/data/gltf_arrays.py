"""glTF accessors as numpy arrays, and back: the array half of :mod:`mar3d.data.gltf`.

Reading follows the glTF 2.0 specification (bufferView strides, sparse substitution,
normalized integers); writing only ever produces the plainest form (tightly packed,
one buffer, no sparse), which every loader reads the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import MeshError

COMPONENT_DTYPES = {5120: np.dtype("<i1"), 5121: np.dtype("<u1"), 5122: np.dtype("<i2"),
                    5123: np.dtype("<u2"), 5125: np.dtype("<u4"), 5126: np.dtype("<f4")}
FLOAT = 5126
UINT32 = 5125
UINT16 = 5123
TYPE_WIDTHS = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT2": 4, "MAT3": 9, "MAT4": 16}
# Largest magnitude of each integer type: a normalized integer c means c / this (spec 3.11).
_NORMALIZED_DIVISORS = {5120: 127.0, 5121: 255.0, 5122: 32767.0, 5123: 65535.0}


@dataclass
class Values:
    """An accessor's elements with the glTF typing that says how to read them."""

    data: np.ndarray  # [count, width], dtype of component_type
    component_type: int
    normalized: bool
    type: str


def _unreadable(message: str) -> MeshError:
    return MeshError("unreadable", f"glTF: {message}"[:500])


def component_dtype(component_type) -> np.dtype:
    if component_type not in COMPONENT_DTYPES:
        raise _unreadable(f"componentType {component_type!r} is not a glTF component type")
    return COMPONENT_DTYPES[component_type]


def type_width(type_name) -> int:
    if type_name not in TYPE_WIDTHS:
        raise _unreadable(f"accessor type {type_name!r} is not a glTF type")
    return TYPE_WIDTHS[type_name]


def view_bytes(doc: dict, buffers: list[bytes], view_index) -> memoryview:
    """The bytes of bufferView ``view_index``, checked to lie inside its buffer."""
    views = doc.get("bufferViews") or []
    if not isinstance(view_index, int) or not 0 <= view_index < len(views):
        raise _unreadable(f"bufferView {view_index!r} does not exist")
    view = views[view_index]
    buffer = view.get("buffer")
    if not isinstance(buffer, int) or not 0 <= buffer < len(buffers):
        raise _unreadable(f"bufferView {view_index} names buffer {buffer!r}, which does not exist")
    start, length = int(view.get("byteOffset", 0)), int(view["byteLength"])
    if start < 0 or length < 0 or start + length > len(buffers[buffer]):
        raise _unreadable(f"bufferView {view_index} [{start}, {start + length}) overruns buffer "
                          f"{buffer} ({len(buffers[buffer])} bytes)")
    return memoryview(buffers[buffer])[start:start + length]


def read_elements(data: memoryview, offset: int, dtype: np.dtype, width: int, count: int,
                  stride: int | None) -> np.ndarray:
    """``count`` elements of ``width`` components, ``stride`` bytes apart (packed if None)."""
    element = dtype.itemsize * width
    stride = stride or element
    if count == 0:
        return np.zeros((0, width), dtype)
    end = offset + (count - 1) * stride + element
    if offset < 0 or stride < element or end > len(data):
        raise _unreadable(f"{count} elements of {element} bytes (stride {stride}) from byte "
                          f"{offset} overrun their bufferView ({len(data)} bytes)")
    strided = np.ndarray((count, width), dtype, buffer=data, offset=offset,
                         strides=(stride, dtype.itemsize))
    return strided.copy()  # contiguous, aligned and independent of the file bytes


def decode_accessor(doc: dict, buffers: list[bytes], index: int) -> Values:
    """Accessor ``index`` as stored: strided data or zeros, then its sparse substitution.
    (The zeros of accessors without a bufferView were bounded by the caller.)"""
    accessor = doc["accessors"][index]
    dtype = component_dtype(accessor.get("componentType"))
    width = type_width(accessor.get("type"))
    count = int(accessor["count"])
    if count < 0:
        raise _unreadable(f"accessor {index} has a negative count")
    if "bufferView" in accessor:
        data = view_bytes(doc, buffers, accessor["bufferView"])  # checks the index too
        stride = doc["bufferViews"][accessor["bufferView"]].get("byteStride")
        data = read_elements(data, int(accessor.get("byteOffset", 0)), dtype, width, count, stride)
    else:
        data = np.zeros((count, width), dtype)  # the spec's value for data it does not store
    if "sparse" in accessor:
        apply_sparse(doc, buffers, accessor["sparse"], data, index)
    return Values(data, accessor["componentType"], bool(accessor.get("normalized")), accessor["type"])


def apply_sparse(doc: dict, buffers: list[bytes], sparse: dict, data: np.ndarray, index: int) -> None:
    """Overwrite the elements a sparse accessor lists (indices and values are packed)."""
    count = int(sparse["count"])
    where, values = sparse["indices"], sparse["values"]
    rows = read_elements(view_bytes(doc, buffers, where["bufferView"]), int(where.get("byteOffset", 0)),
                         component_dtype(where.get("componentType")), 1, count, None)[:, 0]
    new = read_elements(view_bytes(doc, buffers, values["bufferView"]), int(values.get("byteOffset", 0)),
                        data.dtype, data.shape[1], count, None)
    if count and int(rows.max()) >= len(data):
        raise _unreadable(f"sparse accessor {index} writes element {int(rows.max())} of {len(data)}")
    data[rows.astype(np.int64)] = new


def dequantize(values: Values) -> np.ndarray:
    """float32 of what the accessor means: normalized integers scaled into [-1, 1] / [0, 1]
    (signed ones clamped at -1, spec 3.11); other integers keep their integer values
    (KHR_mesh_quantization lets positions be plain integers that node transforms scale)."""
    data = values.data.astype(np.float32)
    if not values.normalized or values.component_type == FLOAT:
        return data
    if values.component_type not in _NORMALIZED_DIVISORS:
        raise _unreadable(f"componentType {values.component_type} cannot be normalized")
    data /= np.float32(_NORMALIZED_DIVISORS[values.component_type])
    return np.maximum(data, np.float32(-1.0)) if values.data.dtype.kind == "i" else data


def as_float(values: Values) -> Values:
    return Values(dequantize(values), FLOAT, False, values.type)


# ------------------------------------------------------------------------ primitives
def strip_triangles(indices: np.ndarray) -> np.ndarray:
    """Triangle list of a triangle strip: every other triangle flips its winding so all
    face the same way (spec 3.7.2.1: p_i = v_i, v_{i+1+i%2}, v_{i+2-i%2})."""
    n = len(indices) - 2
    if n <= 0:
        return np.zeros((0, 3), np.int64)
    i = np.arange(n)
    odd = i % 2
    return np.stack([indices[i], indices[i + 1 + odd], indices[i + 2 - odd]], axis=1)


def fan_triangles(indices: np.ndarray) -> np.ndarray:
    """Triangle list of a triangle fan (spec: p_i = v_{i+1}, v_{i+2}, v_0)."""
    n = len(indices) - 2
    if n <= 0:
        return np.zeros((0, 3), np.int64)
    i = np.arange(n)
    return np.stack([indices[i + 1], indices[i + 2], np.full(n, indices[0])], axis=1)


def drop_degenerate(triangles: np.ndarray) -> np.ndarray:
    """Strips are stitched with repeated indices; those zero-area joints are not faces."""
    t = triangles
    keep = (t[:, 0] != t[:, 1]) & (t[:, 1] != t[:, 2]) & (t[:, 0] != t[:, 2])
    return t[keep]


# --------------------------------------------------------------------------- writing
class BinaryBuilder:
    """The single binary buffer of the rewritten file, grown view by view."""

    def __init__(self):
        self.chunks: list[bytes] = []
        self.size = 0
        self.views: list[dict] = []
        self.accessors: list[dict] = []
        self.values: list[Values] = []  # what each accessor holds, for steps that read it back

    def append(self, data: bytes) -> int:
        """Append ``data`` 4-byte aligned (the largest component size); returns its offset."""
        pad = -self.size % 4
        if pad:
            self.chunks.append(b"\0" * pad)
            self.size += pad
        offset = self.size
        self.chunks.append(bytes(data))
        self.size += len(data)
        return offset

    def add_view(self, data: bytes) -> int:
        self.views.append({"buffer": 0, "byteOffset": self.append(data), "byteLength": len(data)})
        return len(self.views) - 1

    def add_accessor(self, values: Values, with_bounds: bool = False) -> int:
        """Append ``values`` as a tightly packed accessor; returns its index."""
        data = np.ascontiguousarray(values.data, COMPONENT_DTYPES[values.component_type])
        accessor = {"bufferView": self.add_view(data.tobytes()), "componentType": values.component_type,
                    "type": values.type, "count": len(data)}
        if values.normalized:
            accessor["normalized"] = True
        if with_bounds and len(data):  # POSITION must carry min/max (spec 3.6.2.4)
            accessor["min"] = data.min(0).tolist()
            accessor["max"] = data.max(0).tolist()
        self.accessors.append(accessor)
        self.values.append(values)
        return len(self.accessors) - 1

    def bytes(self) -> bytes:
        return b"".join(self.chunks) + b"\0" * (-self.size % 4)


def index_values(triangles: np.ndarray) -> Values:
    return Values(np.asarray(triangles, np.uint32).reshape(-1, 1), UINT32, False, "SCALAR")
