"""Generated malformed and hostile inputs, each with the outcome the jobs must produce.

``write_mesh_corpus(root)`` writes mesh files (and one manifest full of hostile entries)
for ``data prepare``; ``write_image_corpus(root)`` writes image files (and one Parquet
file with hostile ids and rows) for ``generate``. Every case names the error reason the
job must record for it -- or ``"ok"`` for hostile-but-recoverable inputs that the job
is expected to repair (a non-manifold triangle soup is what the watertight step is for).

Nothing here is downloaded: every case is built from a few bytes, numpy and trimesh. The
"10M-face" cases are real files: a binary PLY with 10,000,000 triangles (130 MB, written
once) and a binary STL whose 10,000,000 triangles are a sparse file (no disk used).
"""
from __future__ import annotations

import io
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import trimesh
from PIL import Image

TEN_MILLION = 10_000_000


@dataclass(frozen=True)
class Case:
    name: str        # file name (mesh/image cases) or manifest entry
    expect: str      # reason code the job must record, or "ok"
    what: str        # one line for the report


# ------------------------------------------------------------------------ mesh corpus
def _box_glb() -> bytes:
    return trimesh.creation.box(extents=(1.0, 0.6, 0.4)).export(file_type="glb")


def _glb(doc: dict, binary: bytes = b"") -> bytes:
    """A GLB container around a glTF JSON document and an optional BIN chunk."""
    js = json.dumps(doc).encode()
    js += b" " * (-len(js) % 4)
    binary += b"\0" * (-len(binary) % 4)
    chunks = struct.pack("<II", len(js), 0x4E4F534A) + js
    if binary:
        chunks += struct.pack("<II", len(binary), 0x004E4942) + binary
    return struct.pack("<III", 0x46546C67, 2, 12 + len(chunks)) + chunks


def _triangle_gltf(buffer_uri: str) -> dict:
    return {"asset": {"version": "2.0"}, "scene": 0, "scenes": [{"nodes": [0]}],
            "nodes": [{"mesh": 0}], "meshes": [{"primitives": [{"attributes": {"POSITION": 0}}]}],
            "accessors": [{"bufferView": 0, "componentType": 5126, "count": 3, "type": "VEC3",
                           "min": [0, 0, 0], "max": [1, 1, 0]}],
            "bufferViews": [{"buffer": 0, "byteLength": 36}],
            "buffers": [{"byteLength": 36, "uri": buffer_uri}]}


def _ply_header(num_vertices: int, num_faces: int) -> bytes:
    return (f"ply\nformat binary_little_endian 1.0\nelement vertex {num_vertices}\n"
            "property float x\nproperty float y\nproperty float z\n"
            f"element face {num_faces}\nproperty list uchar int vertex_indices\nend_header\n").encode()


def _ply_faces(faces) -> bytes:
    packed = np.empty(len(faces), np.dtype([("n", "u1"), ("idx", "<i4", (3,))]))
    packed["n"], packed["idx"] = 3, faces
    return packed.tobytes()


def _ply_binary(vertices: np.ndarray, faces: np.ndarray) -> bytes:
    return _ply_header(len(vertices), len(faces)) + vertices.astype("<f4").tobytes() + _ply_faces(faces)


def _stl_binary(triangles: np.ndarray) -> bytes:
    rec = np.zeros(len(triangles), np.dtype([("n", "<f4", (3,)), ("v", "<f4", (3, 3)), ("a", "<u2")]))
    rec["v"] = triangles
    return b"\0" * 80 + struct.pack("<I", len(triangles)) + rec.tobytes()


def _write_10m_face_ply(path: Path) -> None:
    """A real binary PLY with 10M triangles (all on four vertices), streamed to disk."""
    chunk = _ply_faces(np.broadcast_to([0, 1, 2], (1_000_000, 3)))
    with open(path, "wb") as f:
        f.write(_ply_header(4, TEN_MILLION))
        f.write(np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], "<f4").tobytes())
        for _ in range(TEN_MILLION // 1_000_000):
            f.write(chunk)


def _write_sparse_10m_face_stl(path: Path) -> None:
    """A binary STL of 10M (all-zero) triangles: 500 MB long, stored sparse."""
    with open(path, "wb") as f:
        f.write(b"\0" * 80 + struct.pack("<I", TEN_MILLION))
        f.truncate(84 + 50 * TEN_MILLION)


def _write_sparse_oversize(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.write(b"solid big\n")
        f.truncate(size)


MESH_CASES: list[Case] = [
    # -- truncated / garbage containers
    Case("truncated.glb", "unreadable", "GLB cut to a third of its bytes"),
    Case("garbage.glb", "unreadable", "4 KiB of random bytes named .glb"),
    Case("bad_json.glb", "unreadable", "GLB header with a JSON chunk that is not JSON"),
    Case("accessor_overrun.glb", "unreadable", "GLB accessor claims 1M vertices in a 36-byte buffer"),
    Case("garbage.obj", "empty", "random bytes named .obj (no v/f records survive parsing)"),
    Case("truncated.ply", "unreadable", "binary PLY declaring 1000 faces, body cut short"),
    Case("garbage.ply", "unreadable", "a PLY header with an unknown format line"),
    Case("truncated.stl", "unreadable", "binary STL declaring 1000 triangles, body cut short"),
    Case("garbage.stl", "unreadable", "random bytes named .stl"),
    Case("png_renamed.obj", "empty", "a PNG file renamed to .obj"),
    Case("empty.obj", "empty", "zero-byte file"),
    # -- structurally valid, geometrically empty or broken
    Case("zero_faces.obj", "empty", "OBJ with vertices and no faces"),
    Case("zero_faces.ply", "empty", "PLY declaring 0 faces"),
    Case("nan_vertices.obj", "nonfinite_vertices", "OBJ with a NaN coordinate"),
    Case("inf_vertices.ply", "nonfinite_vertices", "binary PLY with +Inf coordinates"),
    Case("inf_vertices.stl", "nonfinite_vertices", "binary STL with -Inf coordinates"),
    Case("face_index_out_of_range.ply", "invalid_faces", "PLY face index 99 with 3 vertices"),
    Case("negative_face_index.ply", "invalid_faces", "PLY face index -7"),
    Case("collinear_soup.obj", "degenerate", "200 zero-area triangles (collinear or repeated corners)"),
    Case("single_point.obj", "degenerate", "every vertex at the same point"),
    Case("overflow_coordinates.obj", "nonfinite_vertices", "coordinates +-1e308: extent overflows to Inf"),
    # -- limits
    Case("ten_million_faces.ply", "too_many_faces", "real binary PLY with 10,000,000 triangles (130 MB)"),
    Case("ten_million_faces_sparse.stl", "too_many_faces", "binary STL with 10,000,000 triangles (sparse file)"),
    Case("oversize.stl", "file_too_large", "600 MB (sparse) file over max_file_bytes"),
    # -- references that escape the mesh's folder
    Case("external_buffer_traversal.gltf", "unsafe_reference", "glTF buffer uri '../../../../etc/passwd'"),
    Case("external_buffer_absolute.gltf", "unsafe_reference", "glTF buffer uri 'file:///etc/passwd'"),
    Case("external_buffer_http.gltf", "unsafe_reference", "glTF buffer uri 'http://169.254.169.254/latest'"),
    Case("mtllib_traversal.obj", "unsafe_reference", "OBJ 'mtllib ../../../../etc/passwd'"),
    # -- hostile but recoverable: the job must repair them into rows
    Case("nonmanifold_soup.obj", "ok", "300 random intersecting triangles (non-manifold soup)"),
    Case("huge_coordinates.ply", "ok", "box at 1e30 scale and 1e30 offset (normalizes fine)"),
]

# Manifest entries (relative to the manifest's folder, which holds the mesh corpus).
MANIFEST_CASES: list[Case] = [
    Case("../../../../../etc/passwd", "path_outside_root", "manifest entry climbing out with ../"),
    Case("/etc/hostname", "path_outside_root", "manifest entry with an absolute path outside the root"),
    Case("sub/../../outside.obj", "path_outside_root", "manifest entry escaping through a subfolder"),
    Case("link_outside.obj", "path_outside_root", "symlink inside the root pointing outside it"),
    Case("nul\x00byte.obj", "invalid_path", "manifest entry with a NUL byte"),
    Case("x" * 5000 + ".obj", "invalid_path", "manifest entry with a 5000-character name"),
    Case("missing.obj", "not_found", "manifest entry naming a file that does not exist"),
    Case("a_folder.obj", "not_found", "manifest entry naming a folder"),
    Case("model.fbx", "unsupported_format", "manifest entry with an unsupported suffix"),
]


def write_mesh_corpus(root: Path) -> list[Case]:
    """Write every MESH_CASES file into ``root``; returns the cases."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    glb = _box_glb()
    w = {c.name: root / c.name for c in MESH_CASES}
    w["truncated.glb"].write_bytes(glb[: len(glb) // 3])
    w["garbage.glb"].write_bytes(rng.bytes(4096))
    w["bad_json.glb"].write_bytes(struct.pack("<III", 0x46546C67, 2, 32)
                                  + struct.pack("<II", 8, 0x4E4F534A) + b"{not json")
    overrun = _triangle_gltf("")
    del overrun["buffers"][0]["uri"]
    overrun["accessors"][0]["count"] = 1_000_000
    w["accessor_overrun.glb"].write_bytes(_glb(overrun, np.zeros(9, "<f4").tobytes()))
    w["garbage.obj"].write_bytes(rng.bytes(4096).replace(b"\nv", b"\nx").replace(b"\nf", b"\nx"))
    verts = rng.random((100, 3)).astype(np.float32)
    faces = rng.integers(0, 100, (1000, 3))
    w["truncated.ply"].write_bytes(_ply_binary(verts, faces)[:900])
    w["garbage.ply"].write_bytes(b"ply\nformat nonsense 9.9\nelement vertex 3\nend_header\n" + rng.bytes(64))
    tris = rng.random((1000, 3, 3)).astype(np.float32)
    w["truncated.stl"].write_bytes(_stl_binary(tris)[:2000])
    w["garbage.stl"].write_bytes(rng.bytes(4096))
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, format="PNG")
    w["png_renamed.obj"].write_bytes(buf.getvalue())
    w["empty.obj"].write_bytes(b"")
    w["zero_faces.obj"].write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nv 0 0 1\n")
    w["zero_faces.ply"].write_bytes(_ply_binary(verts[:4], np.zeros((0, 3), int)))
    w["nan_vertices.obj"].write_text("v 0 0 0\nv 1 0 0\nv 0 nan 1\nv 0 0 1\nf 1 2 3\nf 1 3 4\n")
    box = trimesh.creation.box()
    inf_v = np.array(box.vertices, np.float32)
    inf_v[0] = np.inf
    w["inf_vertices.ply"].write_bytes(_ply_binary(inf_v, box.faces))
    inf_t = np.array(box.triangles, np.float32)
    inf_t[3, 1] = -np.inf
    w["inf_vertices.stl"].write_bytes(_stl_binary(inf_t))
    tri3 = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32)
    w["face_index_out_of_range.ply"].write_bytes(_ply_binary(tri3, np.array([[0, 1, 99]])))
    w["negative_face_index.ply"].write_bytes(_ply_binary(tri3, np.array([[0, 1, -7]])))
    # Integer points on one axis-aligned line: collinear exactly, also after scaling.
    line = "".join(f"v {i} 0 0\n" for i in range(300))
    w["collinear_soup.obj"].write_text(
        line + "".join(f"f {i + 1} {i + 2} {i + 3}\n" for i in range(100))
        + "".join(f"f {i + 1} {i + 1} {i + 2}\n" for i in range(100)))
    w["single_point.obj"].write_text("v 0.5 0.5 0.5\n" * 4 + "f 1 2 3\nf 1 3 4\n")
    w["overflow_coordinates.obj"].write_text("v -1e308 -1e308 -1e308\nv 1e308 1e308 1e308\n"
                                             "v 1e308 -1e308 0\nv 0 0 1e308\nf 1 2 3\nf 1 3 4\nf 2 3 4\n")
    _write_10m_face_ply(w["ten_million_faces.ply"])
    _write_sparse_10m_face_stl(w["ten_million_faces_sparse.stl"])
    _write_sparse_oversize(w["oversize.stl"], 600 * 1024 * 1024)
    for name, uri in [("external_buffer_traversal.gltf", "../../../../etc/passwd"),
                      ("external_buffer_absolute.gltf", "file:///etc/passwd"),
                      ("external_buffer_http.gltf", "http://169.254.169.254/latest")]:
        w[name].write_text(json.dumps(_triangle_gltf(uri)))
    w["mtllib_traversal.obj"].write_text("mtllib ../../../../etc/passwd\nusemtl x\n"
                                         "v 0 0 0\nv 1 0 0\nv 0 1 0\nv 0 0 1\nf 1 2 3\nf 1 3 4\nf 1 2 4\nf 2 3 4\n")
    soup = rng.normal(size=(300, 3, 3))
    w["nonmanifold_soup.obj"].write_text(
        "".join(f"v {x:.5f} {y:.5f} {z:.5f}\n" for x, y, z in soup.reshape(-1, 3))
        + "".join(f"f {3 * i + 1} {3 * i + 2} {3 * i + 3}\n" for i in range(300)))
    huge = trimesh.creation.box(extents=(3e30, 2e30, 1e30))
    w["huge_coordinates.ply"].write_bytes(_ply_binary(np.asarray(huge.vertices) + 1e30, huge.faces))
    return list(MESH_CASES)


def write_hostile_manifest(root: Path, manifest_dir: Path) -> tuple[Path, list[Case]]:
    """A manifest in ``manifest_dir`` listing the mesh corpus in ``root`` (a subfolder of
    it) plus every MANIFEST_CASES entry; returns (manifest path, manifest cases)."""
    (manifest_dir / "a_folder.obj").mkdir(exist_ok=True)
    (manifest_dir / "model.fbx").write_text("not supported")
    outside = manifest_dir.parent / "outside.obj"
    outside.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    link = manifest_dir / "link_outside.obj"
    if not link.is_symlink():
        os.symlink(outside, link)
    entries = [str(Path(os.path.relpath(root, manifest_dir)) / c.name) for c in MESH_CASES]
    entries += [c.name for c in MANIFEST_CASES]
    manifest = manifest_dir / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"path": e}) + "\n" for e in entries))
    return manifest, list(MANIFEST_CASES)


# ----------------------------------------------------------------------- image corpus
def _png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _good_rgb(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.full((size, size, 3), 255, np.uint8)
    lo, hi = sorted(rng.integers(8, size - 8, 2))
    arr[lo:hi, lo:hi] = rng.integers(0, 200, 3, dtype=np.uint8)
    return Image.fromarray(arr)


IMAGE_CASES: list[Case] = [
    Case("random_bytes.png", "invalid_image", "4 KiB of random bytes named .png"),
    Case("truncated.png", "invalid_image", "PNG cut after 60% of its bytes"),
    Case("bad_crc.png", "invalid_image", "PNG with a corrupted IDAT chunk"),
    Case("zero_bytes.jpg", "invalid_image", "zero-byte file"),
    Case("text_named.jpg", "invalid_image", "a text file named .jpg"),
    Case("one_pixel.png", "invalid_image", "1x1 image"),
    Case("one_row.png", "invalid_image", "4096x1 image (smaller side below min_image_side)"),
    Case("gray16.png", "invalid_image", "16-bit grayscale PNG"),
    Case("float32.tiff", "invalid_image", "32-bit float TIFF"),
    Case("cmyk.jpg", "invalid_image", "CMYK JPEG"),
    Case("animated.gif", "invalid_image", "3-frame animated GIF"),
    Case("animated.png", "invalid_image", "3-frame animated PNG (APNG)"),
    Case("bomb.png", "invalid_image", "20000x20000 PNG (decompression bomb, tiny file)"),
    Case("dangling_link.png", "missing_image", "symlink to a file that does not exist"),
    Case("notes.txt", "not_image", "a non-image file in the image folder"),
    Case("Makefile", "not_image", "a file without a suffix in the image folder"),
]

GOOD_IMAGES = ["good_rgb.png", "good_rgba.png", "good_gray.png", "good_palette.gif", "good.jpg", "good.webp"]

# Rows of one Parquet input: (id, image bytes or None, expected reason or "ok").
PARQUET_CASES: list[tuple[str, str, str]] = [
    ("../../escape", "good", "unsafe_id"),
    ("/etc/passwd", "good", "unsafe_id"),
    ("a/./b", "good", "unsafe_id"),
    ("", "good", "unsafe_id"),
    ("twice", "good", "ok"),
    ("twice", "good", "duplicate_id"),
    ("null_bytes", None, "invalid_image"),
    ("empty_bytes", "empty", "invalid_image"),
    ("garbage_bytes", "garbage", "invalid_image"),
    ("parquet_good", "good", "ok"),
]


def write_image_corpus(root: Path) -> tuple[list[Case], list[str]]:
    """Write IMAGE_CASES plus GOOD_IMAGES into ``root``; returns (cases, good names)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(11)
    good = _png(_good_rgb(0))
    (root / "random_bytes.png").write_bytes(rng.bytes(4096))
    (root / "truncated.png").write_bytes(good[: int(len(good) * 0.6)])
    idat = good.index(b"IDAT")
    (root / "bad_crc.png").write_bytes(good[:idat + 8] + bytes(b ^ 0xFF for b in good[idat + 8:idat + 40])
                                       + good[idat + 40:])
    (root / "zero_bytes.jpg").write_bytes(b"")
    (root / "text_named.jpg").write_text("this is not a JPEG\n" * 10)
    Image.new("RGB", (1, 1)).save(root / "one_pixel.png")
    Image.new("RGB", (4096, 1)).save(root / "one_row.png")
    Image.fromarray(np.full((64, 64), 40000, np.uint16)).save(root / "gray16.png")
    Image.fromarray(np.random.default_rng(1).random((64, 64)).astype(np.float32)).save(root / "float32.tiff")
    Image.new("CMYK", (64, 64), (10, 20, 30, 40)).save(root / "cmyk.jpg")
    frames = [_good_rgb(i) for i in range(3)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:])
    frames[0].save(root / "animated.png", save_all=True, append_images=frames[1:])
    Image.new("1", (20000, 20000)).save(root / "bomb.png")
    os.symlink(root / "does_not_exist.png", root / "dangling_link.png")
    (root / "notes.txt").write_text("not an image")
    (root / "Makefile").write_text("all:\n")
    _good_rgb(1).save(root / "good_rgb.png")
    rgba = np.concatenate([np.asarray(_good_rgb(2)), np.full((64, 64, 1), 255, np.uint8)], -1)
    Image.fromarray(rgba).save(root / "good_rgba.png")
    _good_rgb(3).convert("L").save(root / "good_gray.png")
    _good_rgb(4).convert("P").save(root / "good_palette.gif")
    _good_rgb(5).save(root / "good.jpg")
    _good_rgb(6).save(root / "good.webp")
    return list(IMAGE_CASES), list(GOOD_IMAGES)


def write_image_parquet(path: Path) -> list[tuple[str, str]]:
    """One Parquet input with PARQUET_CASES rows; returns [(id, expected)] in row order."""
    good = _png(_good_rgb(8))
    payload = {"good": good, "empty": b"", "garbage": np.random.default_rng(3).bytes(512), None: None}
    table = pa.table({"id": [c[0] for c in PARQUET_CASES],
                      "image": pa.array([payload[c[1]] for c in PARQUET_CASES], pa.binary())})
    pq.write_table(table, path)
    return [(c[0], c[2]) for c in PARQUET_CASES]
