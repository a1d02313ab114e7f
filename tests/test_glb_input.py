"""GLB files as they really come: Draco, KHR_mesh_quantization, sparse accessors, triangle
strips and fans, and required extensions the loader cannot honour. Every fixture is
written by the test: a plain textured box exported by trimesh, then variants made by
rewriting its JSON and binary chunk, checked against the plain file."""
from __future__ import annotations

import base64
import json
import struct

import DracoPy
import numpy as np
import pytest
import trimesh
from PIL import Image

from mar3d.data import MeshError, process_mesh
from mar3d.data.config import small_test_config
from mar3d.data.gltf import as_plain_glb
from mar3d.data.mesh_io import load_mesh, load_scene

LIMITS = dict(max_faces=10**5, max_file_bytes=10**8)
EXTENTS = np.array([1.0, 2.0, 4.0])  # not a cube, so a lost per-axis node scale shows
CENTER = np.array([3.0, 0.0, 0.0])  # off the origin, so a lost node translation shows
DTYPES = {5120: "<i1", 5121: "<u1", 5122: "<i2", 5123: "<u2", 5125: "<u4", 5126: "<f4"}
WIDTHS = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}


# ------------------------------------------------------------------------ glb editing
class Glb:
    """A GLB's JSON and binary chunk, editable: views and accessors are appended."""

    def __init__(self, data: bytes):
        (json_length,) = struct.unpack("<I", data[12:16])
        self.doc = json.loads(data[20:20 + json_length])
        (bin_length,) = struct.unpack("<I", data[20 + json_length:24 + json_length])
        self.bin = bytearray(data[28 + json_length:28 + json_length + bin_length])
        self.extra_buffers: list[dict] = []  # buffers after the binary chunk (no data here)

    @property
    def prim(self) -> dict:
        return self.doc["meshes"][0]["primitives"][0]

    def read(self, index: int) -> np.ndarray:
        """A tightly packed, non-sparse accessor (what trimesh exports)."""
        a = self.doc["accessors"][index]
        view = self.doc["bufferViews"][a["bufferView"]]
        start = view.get("byteOffset", 0) + a.get("byteOffset", 0)
        width = WIDTHS[a["type"]]
        return np.frombuffer(bytes(self.bin), DTYPES[a["componentType"]], a["count"] * width,
                             start).reshape(a["count"], width)

    def add_view(self, data: bytes, stride: int | None = None) -> int:
        self.bin += b"\0" * (-len(self.bin) % 4)
        view = {"buffer": 0, "byteOffset": len(self.bin), "byteLength": len(data)}
        if stride:
            view["byteStride"] = stride
        self.bin += data
        self.doc["bufferViews"].append(view)
        return len(self.doc["bufferViews"]) - 1

    def add_accessor(self, array: np.ndarray | None, component_type: int, type_: str,
                     count: int | None = None, **fields) -> int:
        accessor = {"componentType": component_type, "type": type_, **fields}
        if array is not None:
            data = np.ascontiguousarray(array, DTYPES[component_type])
            accessor.update(bufferView=self.add_view(data.tobytes()), count=len(data))
        else:
            accessor["count"] = count
        self.doc["accessors"].append(accessor)
        return len(self.doc["accessors"]) - 1

    def bytes(self) -> bytes:
        self.doc["buffers"] = [{"byteLength": len(self.bin)}] + self.extra_buffers
        text = json.dumps(self.doc).encode()
        text += b" " * (-len(text) % 4)
        binary = bytes(self.bin) + b"\0" * (-len(self.bin) % 4)
        body = (struct.pack("<II", len(text), 0x4E4F534A) + text
                + struct.pack("<II", len(binary), 0x004E4942) + binary)
        return b"glTF" + struct.pack("<II", 2, 12 + len(body)) + body


def textured_box() -> trimesh.Trimesh:
    box = trimesh.creation.box(extents=EXTENTS)
    box.unmerge_vertices()  # every face its own corners, so UV seams are real seams
    box.apply_translation(CENTER)
    uv = ((box.vertices[:, :2] - CENTER[:2]) / EXTENTS[:2] + 0.5) * 0.5 + 0.25  # in {0.25, 0.75}
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), np.uint8))
    box.visual = trimesh.visual.TextureVisuals(uv=uv, image=image)
    return box


@pytest.fixture(scope="module")
def plain_glb() -> bytes:
    return textured_box().export(file_type="glb")


def write(tmp_path, data: bytes, name: str = "m.glb"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def corners(mesh, decimals: int = 3) -> np.ndarray:
    """Triangles as [F, 3, 3 (+2 uv)] rounded corners, each rotated to start at its
    smallest corner (which keeps the winding) and sorted: equal for the same triangles
    whatever the vertex order, welding or face order."""
    v = np.asarray(mesh.vertices)
    cols = [v]
    uv = getattr(mesh.parts[0].visual, "uv", None) if hasattr(mesh, "parts") else None
    if uv is not None and len(mesh.parts) == 1:
        cols.append(np.asarray(uv))
    table = np.round(np.concatenate(cols, axis=1)[mesh.faces], decimals) + 0.0  # no -0.0
    rotated = []
    for tri in table:
        first = min(range(3), key=lambda k: tuple(tri[k]))
        rotated.append(np.roll(tri, -first, axis=0))
    rotated = np.array(rotated)
    order = np.lexsort(rotated.reshape(len(rotated), -1).T[::-1])
    return rotated[order]


def assert_same_mesh(path, reference_path, check_transform: bool = True):
    got = load_mesh(path, **LIMITS)
    want = load_mesh(reference_path, **LIMITS)
    assert len(got.faces) == len(want.faces)
    assert np.array_equal(corners(got), corners(want))
    if check_transform:  # the original coordinates too, not only the normalized shape
        assert np.allclose(got.transform, want.transform, atol=1e-3)
    return got, want


# ------------------------------------------------------------------------------ cases
def test_plain_file_is_not_rewritten(tmp_path, plain_glb):
    path = write(tmp_path, plain_glb)
    assert as_plain_glb(path, LIMITS["max_faces"]) is None
    assert load_mesh(path, **LIMITS).parts[0].visual.uv is not None


def draco_variant(plain_glb: bytes) -> bytes:
    """The box's geometry and UVs in one KHR_draco_mesh_compression blob, as Blender or
    gltf-transform write it: the accessors keep their types but lose their data."""
    glb = Glb(plain_glb)
    prim = glb.prim
    points = glb.read(prim["attributes"]["POSITION"])
    uv = glb.read(prim["attributes"]["TEXCOORD_0"])
    faces = glb.read(prim["indices"]).reshape(-1, 3)
    normals = trimesh.Trimesh(points, faces, process=False).face_normals.repeat(3, axis=0)  # unmerged
    blob = DracoPy.encode(points, faces, quantization_bits=14, tex_coord=uv.astype(np.float64),
                          normals=normals, colors=draco_colors(points))
    ids = {a["attribute_type"]: a["unique_id"] for a in DracoPy.decode(blob).attributes}
    prim["attributes"] = {
        "POSITION": glb.add_accessor(None, 5126, "VEC3", len(points), min=points.min(0).tolist(),
                                     max=points.max(0).tolist()),
        "NORMAL": glb.add_accessor(None, 5126, "VEC3", len(points)),
        "TEXCOORD_0": glb.add_accessor(None, 5126, "VEC2", len(uv)),
        "COLOR_0": glb.add_accessor(None, 5121, "VEC4", len(points), normalized=True)}
    prim["indices"] = glb.add_accessor(None, 5125, "SCALAR", faces.size)
    kinds = {"POSITION": "POSITION", "NORMAL": "NORMAL", "TEXCOORD_0": "TEX_COORD", "COLOR_0": "COLOR"}
    prim["extensions"] = {"KHR_draco_mesh_compression": {
        "bufferView": glb.add_view(blob),
        "attributes": {name: ids[getattr(DracoPy.AttributeType, kind)] for name, kind in kinds.items()}}}
    glb.doc["extensionsUsed"] = glb.doc["extensionsRequired"] = ["KHR_draco_mesh_compression"]
    return glb.bytes()


def draco_colors(points: np.ndarray) -> np.ndarray:
    """RGBA uint8 that says on which side of the centre a vertex lies."""
    side = (np.asarray(points) > CENTER).astype(np.uint8) * 255
    return np.concatenate([side, np.full((len(side), 1), 255, np.uint8)], axis=1)


def test_draco(tmp_path, plain_glb):
    path = write(tmp_path, draco_variant(plain_glb))
    assert as_plain_glb(path, LIMITS["max_faces"]) is not None  # decoded here, not by trimesh
    got, _ = assert_same_mesh(path, write(tmp_path, plain_glb, "p.glb"))  # positions, faces, UVs
    part = got.parts[0]
    # Each attribute came back under its own name: normals are the face's, colours the side's.
    assert np.allclose(part.vertex_normals[part.faces], part.face_normals[:, None], atol=1e-3)
    # (Read from the scene: flattening copies the parts, and trimesh's copy of a textured
    # visual drops its vertex colours.)
    (geometry,) = load_scene(path, LIMITS["max_faces"]).geometry.values()
    colors = geometry.visual.vertex_attributes["color"]
    assert np.array_equal(colors, draco_colors(np.round(geometry.vertices, 3)))


def test_quantized_int16_positions_with_node_scale(tmp_path, plain_glb):
    """KHR_mesh_quantization as gltfpack writes it: int16 normalized positions padded to
    8-byte strides, int8 normalized normals, and a node transform that scales them back."""
    glb = Glb(plain_glb)
    points = glb.read(glb.prim["attributes"]["POSITION"]).astype(np.float64)
    scale = np.abs(points - CENTER).max(0)
    q = np.round((points - CENTER) / scale * 32767).astype("<i2")
    padded = np.concatenate([q, np.zeros((len(q), 1), "<i2")], axis=1)  # VEC3 in 8 bytes
    view = glb.add_view(padded.tobytes(), stride=8)
    glb.doc["accessors"].append({"bufferView": view, "componentType": 5122, "type": "VEC3",
                                 "normalized": True, "count": len(q),
                                 "min": q.min(0).tolist(), "max": q.max(0).tolist()})
    glb.prim["attributes"]["POSITION"] = len(glb.doc["accessors"]) - 1
    mesh = textured_box()
    normals = np.round(mesh.face_normals.repeat(3, axis=0) * 127).astype("<i1")  # unmerged: 3 per face
    glb.prim["attributes"]["NORMAL"] = glb.add_accessor(
        np.concatenate([normals, np.zeros((len(normals), 1), "<i1")], axis=1)[:, :3], 5120, "VEC3",
        normalized=True)
    glb.doc["nodes"][0].update(translation=CENTER.tolist(), scale=scale.tolist())
    glb.doc["extensionsUsed"] = glb.doc["extensionsRequired"] = ["KHR_mesh_quantization"]
    got, _ = assert_same_mesh(write(tmp_path, glb.bytes()), write(tmp_path, plain_glb, "p.glb"))
    part = got.parts[0]
    assert np.allclose(part.vertex_normals, mesh.face_normals.repeat(3, axis=0), atol=1e-2)


def test_quantized_uv_uint16_normalized(tmp_path, plain_glb):
    glb = Glb(plain_glb)
    uv = glb.read(glb.prim["attributes"]["TEXCOORD_0"])
    glb.prim["attributes"]["TEXCOORD_0"] = glb.add_accessor(np.round(uv * 65535), 5123, "VEC2",
                                                            normalized=True)
    glb.doc["extensionsUsed"] = glb.doc["extensionsRequired"] = ["KHR_mesh_quantization"]
    got, want = assert_same_mesh(write(tmp_path, glb.bytes()), write(tmp_path, plain_glb, "p.glb"))
    assert np.allclose(got.parts[0].visual.uv, want.parts[0].visual.uv, atol=1e-4)


@pytest.mark.parametrize("buffer_uri", ["m.bin", "data"])
def test_gltf_with_buffer_and_image_beside_it(tmp_path, plain_glb, buffer_uri):
    """A .gltf that needs the rewrite: its buffer (a file beside it, or a data: URI) is read
    here, its image file is still found by trimesh."""
    glb = Glb(plain_glb)
    uv = glb.read(glb.prim["attributes"]["TEXCOORD_0"])
    glb.prim["attributes"]["TEXCOORD_0"] = glb.add_accessor(np.round(uv * 65535), 5123, "VEC2",
                                                            normalized=True)
    image = glb.doc["images"][0]
    view = glb.doc["bufferViews"][image.pop("bufferView")]
    (tmp_path / "tex.png").write_bytes(glb.bin[view["byteOffset"]:view["byteOffset"] + view["byteLength"]])
    image["uri"] = "tex.png"
    glb.bytes()  # sets byteLength
    if buffer_uri == "data":
        buffer_uri = "data:application/octet-stream;base64," + base64.b64encode(glb.bin).decode()
    else:
        (tmp_path / buffer_uri).write_bytes(glb.bin)
    glb.doc["buffers"][0]["uri"] = buffer_uri
    path = tmp_path / "m.gltf"
    path.write_text(json.dumps(glb.doc))
    assert as_plain_glb(path, LIMITS["max_faces"]) is not None
    got, _ = assert_same_mesh(path, write(tmp_path, plain_glb, "p.glb"))
    texture = got.parts[0].visual.material.baseColorTexture
    assert texture is not None and texture.size == (8, 8)


def test_sparse_accessor_moves_vertices(tmp_path, plain_glb):
    glb = Glb(plain_glb)
    points = glb.read(glb.prim["attributes"]["POSITION"]).copy()
    moved = np.flatnonzero(points[:, 0] > CENTER[0])  # the +x face stretches out
    values = points[moved] + [1.5, 0.0, 0.0]
    glb.doc["accessors"][glb.prim["attributes"]["POSITION"]]["sparse"] = {
        "count": len(moved),
        "indices": {"bufferView": glb.add_view(moved.astype("<u2").tobytes()), "componentType": 5123},
        "values": {"bufferView": glb.add_view(values.astype("<f4").tobytes())}}
    stretched = textured_box()
    stretched.vertices[stretched.vertices[:, 0] > CENTER[0], 0] += 1.5
    assert_same_mesh(write(tmp_path, glb.bytes()), write(tmp_path, stretched.export(file_type="glb"), "p.glb"))


def test_sparse_accessor_without_buffer_view_starts_from_zeros(tmp_path, plain_glb):
    glb = Glb(plain_glb)
    points = glb.read(glb.prim["attributes"]["POSITION"])
    rows = np.arange(len(points))
    glb.doc["accessors"].append({"componentType": 5126, "type": "VEC3", "count": len(points), "sparse": {
        "count": len(points),
        "indices": {"bufferView": glb.add_view(rows.astype("<u4").tobytes()), "componentType": 5125},
        "values": {"bufferView": glb.add_view(points.astype("<f4").tobytes())}}})
    glb.prim["attributes"]["POSITION"] = len(glb.doc["accessors"]) - 1
    assert_same_mesh(write(tmp_path, glb.bytes()), write(tmp_path, plain_glb, "p.glb"))


def band(n: int = 12):
    """A closed cylinder band: bottom and top rings interleaved, the order a strip wants."""
    angle = np.linspace(0, 2 * np.pi, n, endpoint=False)
    ring = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    points = np.zeros((2 * n, 3))
    points[0::2, :2] = points[1::2, :2] = ring
    points[1::2, 2] = 1.0
    return points


def hand_built(points: np.ndarray, mode: int, indices: np.ndarray | None) -> bytes:
    glb = Glb(trimesh.creation.box().export(file_type="glb"))  # borrow a valid skeleton
    glb.doc["accessors"], glb.doc["bufferViews"], glb.bin = [], [], bytearray()
    prim = {"attributes": {"POSITION": glb.add_accessor(points, 5126, "VEC3", min=points.min(0).tolist(),
                                                        max=points.max(0).tolist())}, "mode": mode}
    if indices is not None:
        prim["indices"] = glb.add_accessor(indices, 5123, "SCALAR")
    glb.doc["meshes"] = [{"primitives": [prim]}]
    return glb.bytes()


def outward(mesh, axis_point=np.zeros(3)) -> np.ndarray:
    """Dot of each face normal with the direction from the axis (z) to the face centre."""
    centre = mesh.vertices[mesh.faces].mean(1) - axis_point
    centre[:, 2] = 0
    normals = np.cross(*(mesh.vertices[mesh.faces][:, k] - mesh.vertices[mesh.faces][:, 0] for k in (1, 2)))
    return np.einsum("ij,ij->i", normals, centre)


def test_triangle_strip(tmp_path):
    points = band()
    n = len(points)
    strip = np.concatenate([np.arange(n), [0, 1]])  # wraps around to close the band
    got = load_mesh(write(tmp_path, hand_built(points, 5, strip)), **LIMITS)
    listed = np.array([(strip[i], strip[i + 1 + i % 2], strip[i + 2 - i % 2]) for i in range(len(strip) - 2)])
    want = load_mesh(write(tmp_path, hand_built(points, 4, listed.reshape(-1)), "p.glb"), **LIMITS)
    assert len(got.faces) == n
    assert np.array_equal(corners(got), corners(want))
    signs = np.sign(outward(got))
    assert (signs == signs[0]).all()  # every other triangle flipped: one consistent winding


def test_triangle_fan(tmp_path):
    n = 10
    angle = np.linspace(0, 2 * np.pi, n + 1)  # the last repeats the first: a closed cone
    points = np.concatenate([[[0, 0, 1.0]], np.stack([np.cos(angle), np.sin(angle), np.zeros(n + 1)], 1)])
    got = load_mesh(write(tmp_path, hand_built(points, 6, None)), **LIMITS)  # drawn in vertex order
    listed = np.array([(i + 1, i + 2, 0) for i in range(len(points) - 2)])
    want = load_mesh(write(tmp_path, hand_built(points, 4, listed.reshape(-1)), "p.glb"), **LIMITS)
    assert len(got.faces) == n
    assert np.array_equal(corners(got), corners(want))
    signs = np.sign(outward(got))
    assert (signs == signs[0]).all()


def meshopt_variant(plain_glb: bytes, extension: str = "EXT_meshopt_compression") -> bytes:
    """The box as gltfpack writes it with -cc: every accessor's data in a meshopt-compressed
    view (attributes, triangle indices), normals as octahedral int8 through the decoder's
    filter, the views' uncompressed home a fallback buffer without data."""
    import meshopt

    glb = Glb(plain_glb)
    prim = glb.prim
    fallback_length = 0
    normals = trimesh.Trimesh(glb.read(prim["attributes"]["POSITION"]), glb.read(prim["indices"]).reshape(-1, 3),
                              process=False).face_normals.repeat(3, axis=0)  # unmerged: 3 per face

    def compressed_view(data: np.ndarray, mode: str, stride: int, filter_: str = "NONE") -> int:
        nonlocal fallback_length
        count = len(data) if mode == "ATTRIBUTES" else data.size
        encoded = meshopt.encode_gltf_buffer(data, mode)
        source = glb.add_view(encoded)
        compressed = glb.doc["bufferViews"].pop(source)  # where the compressed bytes lie
        view = {"buffer": 1, "byteOffset": fallback_length, "byteLength": count * stride,
                "extensions": {extension: {**compressed, "byteStride": stride, "count": count,
                                           "mode": mode, "filter": filter_}}}
        if mode == "ATTRIBUTES":
            view["byteStride"] = stride
        fallback_length += count * stride
        glb.doc["bufferViews"].append(view)
        return len(glb.doc["bufferViews"]) - 1

    for name, index in list(prim["attributes"].items()) + [("indices", prim["indices"])]:
        accessor = dict(glb.doc["accessors"][index])
        values = glb.read(index)
        if name == "indices":
            accessor["bufferView"] = compressed_view(values.reshape(-1).astype("<u4"), "TRIANGLES", 4)
        else:
            accessor["bufferView"] = compressed_view(np.ascontiguousarray(values, "<f4"), "ATTRIBUTES",
                                                     values.shape[1] * 4)
        accessor.pop("byteOffset", None)
        glb.doc["accessors"].append(accessor)
        if name == "indices":
            prim["indices"] = len(glb.doc["accessors"]) - 1
        else:
            prim["attributes"][name] = len(glb.doc["accessors"]) - 1
    octahedral = meshopt.encode_filter_oct(np.concatenate([normals, np.ones((len(normals), 1))], 1), 4, 8)
    view = compressed_view(octahedral, "ATTRIBUTES", 4, "OCTAHEDRAL")
    glb.doc["accessors"].append({"bufferView": view, "componentType": 5120, "normalized": True,
                                 "type": "VEC3", "count": len(normals)})
    prim["attributes"]["NORMAL"] = len(glb.doc["accessors"]) - 1
    glb.extra_buffers = [{"byteLength": fallback_length, "extensions": {extension: {"fallback": True}}}]
    glb.doc["extensionsUsed"] = glb.doc["extensionsRequired"] = [extension, "KHR_mesh_quantization"]
    return glb.bytes()


@pytest.mark.parametrize("extension", ["EXT_meshopt_compression", "KHR_meshopt_compression"])
def test_meshopt(tmp_path, plain_glb, extension):
    path = write(tmp_path, meshopt_variant(plain_glb, extension))
    assert as_plain_glb(path, LIMITS["max_faces"]) is not None  # decoded here; trimesh cannot
    got, _ = assert_same_mesh(path, write(tmp_path, plain_glb, "p.glb"))  # positions, faces, UVs
    part = got.parts[0]
    # The octahedral normals came back through the decoder's filter: each vertex has its face's.
    assert np.allclose(part.vertex_normals[part.faces], part.face_normals[:, None], atol=0.02)


def test_meshopt_data_that_does_not_decode_is_refused(tmp_path, plain_glb):
    glb = Glb(meshopt_variant(plain_glb))
    view = next(v for v in glb.doc["bufferViews"] if "extensions" in v)
    compressed = view["extensions"]["EXT_meshopt_compression"]
    glb.bin[compressed["byteOffset"]:compressed["byteOffset"] + compressed["byteLength"]] = \
        b"\xff" * compressed["byteLength"]
    with pytest.raises(MeshError) as e:
        load_mesh(write(tmp_path, glb.bytes()), **LIMITS)
    assert e.value.reason_code == "unreadable" and "meshopt" in e.value.message, e.value.message


@pytest.mark.parametrize("extension", ["KHR_texture_basisu", "EXT_made_up_geometry"])
def test_required_extension_refused(tmp_path, plain_glb, extension):
    glb = Glb(plain_glb)
    glb.doc["extensionsUsed"] = glb.doc["extensionsRequired"] = [extension]
    with pytest.raises(MeshError) as e:
        load_mesh(write(tmp_path, glb.bytes()), **LIMITS)
    assert e.value.reason_code == "unsupported_extension"
    assert extension in e.value.message


def test_extension_used_but_not_required_loads(tmp_path, plain_glb):
    glb = Glb(plain_glb)
    glb.doc["extensionsUsed"] = ["EXT_made_up_geometry", "EXT_meshopt_compression"]
    path = write(tmp_path, glb.bytes())
    assert as_plain_glb(path, LIMITS["max_faces"]) is None
    assert_same_mesh(path, write(tmp_path, plain_glb, "p.glb"))


@pytest.mark.parametrize("sparse", [True, False])
def test_bufferless_accessor_too_large_is_refused(tmp_path, plain_glb, sparse):
    """The count of an accessor without data costs nothing in the file: 10^9 vertices
    must be refused, not allocated (trimesh alone would allocate 12 GB of zeros)."""
    glb = Glb(plain_glb)
    accessor = glb.doc["accessors"][glb.prim["attributes"]["POSITION"]]
    accessor.pop("bufferView")
    accessor["count"] = 10**9
    if sparse:
        accessor["sparse"] = {
            "count": 1, "indices": {"bufferView": glb.add_view(b"\0\0\0\0"), "componentType": 5125},
            "values": {"bufferView": glb.add_view(b"\0" * 12)}}
    with pytest.raises(MeshError) as e:
        load_mesh(write(tmp_path, glb.bytes()), **LIMITS)
    assert e.value.reason_code == "too_many_faces"


def test_process_mesh_on_draco(tmp_path, plain_glb):
    row = process_mesh(write(tmp_path, draco_variant(plain_glb)), small_test_config())
    images = row["images"]
    assert images[..., 3].any() and images[..., :3].std() > 1  # something textured is in view
    # Normalized box: the longest half-side is 1, so half-extents are EXTENTS / 4.
    half = EXTENTS / EXTENTS.max()
    points = row["surface_0"][:, :3]
    inside = np.clip(np.abs(points), None, half)
    outside_gap = np.linalg.norm(np.abs(points) - inside, axis=1)  # > 0 outside the box
    inside_gap = (half - np.abs(points)).min(1)  # > 0 strictly inside
    distance = np.where(outside_gap > 0, outside_gap, inside_gap)
    assert np.abs(distance).max() < 0.05


def test_gltf_is_turned_into_a_z_up_dataset_and_formats_without_a_convention_are_not(tmp_path, plain_glb):
    # The box is 1 x 2 x 4 in glTF's +Y-up frame: in a z-up dataset its y extent (2) becomes
    # the up (z) extent and its z extent (4) the depth along -y; an OBJ of the same box is
    # taken as it is.
    glb = write(tmp_path, plain_glb)
    obj = tmp_path / "box.obj"
    textured_box().export(obj)
    for path, up, want in ((glb, "y", EXTENTS), (glb, "z", EXTENTS[[0, 2, 1]]),
                           (obj, "y", EXTENTS), (obj, "z", EXTENTS)):
        mesh = load_mesh(path, **LIMITS, up_axis=up)
        extent = np.ptp(mesh.vertices, axis=0)
        assert np.allclose(extent / extent.max(), want / want.max()), (path.name, up, extent)
        # transform maps the file's coordinates to the stored ones (rotation included),
        # and the rotation is proper: faces keep pointing outwards.
        original = trimesh.load(path, force="mesh", process=False).vertices
        assert np.allclose(trimesh.transform_points(original, mesh.transform).min(0), mesh.vertices.min(0))
        assert mesh.mesh.volume > 0
    with pytest.raises(ValueError, match="up_axis"):
        load_mesh(glb, **LIMITS, up_axis="x")
