"""GLB files whose mesh loads but whose look or extent went wrong without an error: vertex
colours under a material, specular-glossiness with a palette texture, alpha modes,
KHR_texture_transform, and scenes that carry a skybox or a ground plane. Every fixture
is written here from numpy arrays and PIL images (``CASES`` lists them for
benchmarks/glb_render_sheet.py, which renders them through the data job)."""
from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest
import trimesh
from PIL import Image

from mar3d.data import MeshError, process_mesh
from mar3d.data.config import small_test_config
from mar3d.data.gltf import as_plain_glb, uv_transform_matrix
from mar3d.data.mesh_io import load_mesh
from mar3d.data.prepare.job import _keeps_column
from mar3d.data.render import render_views, texture_array
from mar3d.data.schema import rows_to_batch, shard_schema

LIMITS = dict(max_faces=10**5, max_file_bytes=10**8)
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
SPEC_GLOSS = "KHR_materials_pbrSpecularGlossiness"
TRANSFORM = "KHR_texture_transform"
_DTYPES = {5120: "<i1", 5121: "<u1", 5122: "<i2", 5123: "<u2", 5125: "<u4", 5126: "<f4"}
_TYPES = {1: "SCALAR", 2: "VEC2", 3: "VEC3", 4: "VEC4"}


# ------------------------------------------------------------------------ glb writing
class Gltf:
    """A glTF document with one binary buffer, built part by part, written as GLB."""

    def __init__(self):
        self.doc = {"asset": {"version": "2.0"}, "scene": 0, "scenes": [{"nodes": []}], "nodes": [],
                    "meshes": [], "accessors": [], "bufferViews": [], "materials": [], "textures": [],
                    "images": [], "samplers": [{"magFilter": 9728, "minFilter": 9728}]}  # NEAREST
        self.bin = bytearray()

    def view(self, data: bytes) -> int:
        self.bin += b"\0" * (-len(self.bin) % 4)
        self.doc["bufferViews"].append({"buffer": 0, "byteOffset": len(self.bin), "byteLength": len(data)})
        self.bin += data
        return len(self.doc["bufferViews"]) - 1

    def accessor(self, array, component_type: int = 5126, normalized: bool = False) -> int:
        a = np.asarray(array)
        a = a.reshape(len(a), -1)
        accessor = {"bufferView": self.view(np.ascontiguousarray(a, _DTYPES[component_type]).tobytes()),
                    "componentType": component_type, "type": _TYPES[a.shape[1]], "count": len(a)}
        if normalized:
            accessor["normalized"] = True
        if component_type == 5126 and a.shape[1] == 3:  # POSITION needs bounds
            accessor.update(min=a.min(0).tolist(), max=a.max(0).tolist())
        self.doc["accessors"].append(accessor)
        return len(self.doc["accessors"]) - 1

    def texture(self, image: Image.Image) -> int:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        self.doc["images"].append({"bufferView": self.view(buf.getvalue()), "mimeType": "image/png"})
        self.doc["textures"].append({"source": len(self.doc["images"]) - 1, "sampler": 0})
        return len(self.doc["textures"]) - 1

    def material(self, **fields) -> int:
        self.doc["materials"].append(fields)
        return len(self.doc["materials"]) - 1

    def add(self, mesh: trimesh.Trimesh | tuple, material: int | None = None, name: str | None = None,
            **attributes) -> None:
        """One node with one primitive: ``mesh`` (or (vertices, faces)), its material and
        attributes given as arrays or (array, componentType, normalized)."""
        vertices, faces = (mesh.vertices, mesh.faces) if isinstance(mesh, trimesh.Trimesh) else mesh
        attrs = {"POSITION": self.accessor(np.asarray(vertices, np.float32))}
        for key, value in attributes.items():
            attrs[key] = self.accessor(*value) if isinstance(value, tuple) else self.accessor(value)
        prim = {"attributes": attrs, "indices": self.accessor(np.asarray(faces).reshape(-1), 5125)}
        if material is not None:
            prim["material"] = material
        self.doc["meshes"].append({"primitives": [prim]})
        self.doc["nodes"].append({"mesh": len(self.doc["meshes"]) - 1, **({"name": name} if name else {})})
        self.doc["scenes"][0]["nodes"].append(len(self.doc["nodes"]) - 1)

    def require(self, *extensions: str) -> None:
        self.doc["extensionsUsed"] = self.doc["extensionsRequired"] = list(extensions)

    def bytes(self) -> bytes:
        doc = {k: v for k, v in self.doc.items() if v != []}
        if "textures" not in doc:
            doc.pop("samplers")
        doc["buffers"] = [{"byteLength": len(self.bin)}]
        text = json.dumps(doc).encode()
        text += b" " * (-len(text) % 4)
        binary = bytes(self.bin) + b"\0" * (-len(self.bin) % 4)
        body = (struct.pack("<II", len(text), 0x4E4F534A) + text
                + struct.pack("<II", len(binary), 0x004E4942) + binary)
        return b"glTF" + struct.pack("<II", 2, 12 + len(body)) + body


def quad(z: float = 0.0, x0: float = -0.5, x1: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vertices, faces, glTF UVs) of an upright quad facing +z (the (0, 0) camera), its
    UVs spanning the texture left to right (glTF's v runs down)."""
    vertices = np.array([[x0, -0.5, z], [x1, -0.5, z], [x1, 0.5, z], [x0, 0.5, z]], np.float32)
    uv = np.array([[0, 1], [1, 1], [1, 0], [0, 0]], np.float32)
    return vertices, np.array([[0, 1, 2], [0, 2, 3]]), uv


def two_tone(left, right, mode: str | None = None) -> Image.Image:
    """A 2 x 1 image: ``left`` texel, ``right`` texel (RGB or RGBA by their length, or ``mode``)."""
    image = Image.new("RGBA" if len(left) == 4 else "RGB", (2, 1))
    image.putpixel((0, 0), tuple(left))
    image.putpixel((1, 0), tuple(right))
    if mode == "P":
        return image.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    return image.convert(mode) if mode else image


# ------------------------------------------------------------------------- fixtures
def vertex_colors_glb(color_type: str = "uint8", texture: bool = False, factor=(1.0, 1.0, 1.0, 1.0)) -> bytes:
    """A quad, left half red and right half green by COLOR_0, under a white material
    (a factor, or a white texture too)."""
    g = Gltf()
    left, right = quad(x1=0.0), quad(x0=0.0)
    vertices = np.concatenate([left[0], right[0]])
    faces = np.concatenate([left[1], right[1] + 4])
    uv = np.concatenate([left[2], right[2]])
    colors = np.array([RED + (255,)] * 4 + [GREEN + (255,)] * 4, np.float64) / 255.0
    encoded = {"uint8": (np.round(colors * 255), 5121, True), "uint16": (np.round(colors * 65535), 5123, True),
               "float_rgb": (colors[:, :3], 5126, False)}[color_type]
    pbr = {"baseColorFactor": list(factor)}
    if texture:
        pbr["baseColorTexture"] = {"index": g.texture(Image.new("RGB", (2, 2), WHITE))}
    g.add((vertices, faces), g.material(pbrMetallicRoughness=pbr), COLOR_0=encoded, TEXCOORD_0=uv)
    return g.bytes()


def spec_gloss_glb(mode: str = "P", diffuse_factor=(1.0, 1.0, 1.0, 1.0)) -> bytes:
    """A quad with a KHR_materials_pbrSpecularGlossiness material whose diffuse texture is
    a palette PNG, left red and right blue (and no specular values: the defaults)."""
    g = Gltf()
    vertices, faces, uv = quad()
    spec_gloss = {"diffuseTexture": {"index": g.texture(two_tone(RED, BLUE, mode))},
                  "diffuseFactor": list(diffuse_factor)}
    g.add((vertices, faces), g.material(extensions={SPEC_GLOSS: spec_gloss}), TEXCOORD_0=uv)
    g.require(SPEC_GLOSS)
    return g.bytes()


def alpha_glb(mode: str | None, left_alpha: int, cutoff: float | None = None, backdrop: bool = True,
              alpha_by: str = "texture") -> bytes:
    """A red quad in front of a blue one; the red one's left half has alpha
    ``left_alpha`` (by its texture, or by COLOR_0), its right half is opaque."""
    g = Gltf()
    vertices, faces, uv = quad(z=0.2)
    material = {"pbrMetallicRoughness": {"baseColorFactor": [1.0, 1.0, 1.0, 1.0]}}
    if mode is not None:
        material["alphaMode"] = mode
    if cutoff is not None:
        material["alphaCutoff"] = cutoff
    attributes = {}
    if alpha_by == "texture":
        texture = g.texture(two_tone(RED + (left_alpha,), RED + (255,)))
        material["pbrMetallicRoughness"]["baseColorTexture"] = {"index": texture}
        attributes["TEXCOORD_0"] = uv
    else:  # vertices on the left carry the alpha (the quad is split at x = 0)
        left, right = quad(z=0.2, x1=0.0), quad(z=0.2, x0=0.0)
        vertices, faces = np.concatenate([left[0], right[0]]), np.concatenate([left[1], right[1] + 4])
        colors = np.array([RED + (left_alpha,)] * 4 + [RED + (255,)] * 4)
        attributes["COLOR_0"] = (colors, 5121, True)
    g.add((vertices, faces), g.material(**material), **attributes)
    if backdrop:
        back = quad(z=-0.2)
        g.add(back[:2], g.material(pbrMetallicRoughness={"baseColorFactor": [0.0, 0.0, 1.0, 1.0]}))
    return g.bytes()


TEXTURE = np.random.default_rng(3).integers(0, 256, (4, 4, 3), np.uint8)  # 16 distinct texels
TRANSFORM_FIELDS = {"offset": [0.25, 0.5], "rotation": 0.4, "scale": [0.5, 0.75]}


def texture_transform_glb(transformed: bool = True, texcoord: int = 1, spec_gloss: bool = False) -> bytes:
    """A quad with a 4 x 4 texture. ``transformed``: the material samples TEXCOORD_1
    through KHR_texture_transform (TEXCOORD_0 holds zeros, which must not be used), as
    its base colour or (``spec_gloss``) diffuse texture; else the reference: TEXCOORD_0
    holds the UVs the transform gives, worked out here."""
    g = Gltf()
    vertices, faces, uv = quad()
    texture = g.texture(Image.fromarray(TEXTURE))
    if transformed:
        info = {"index": texture, "extensions": {TRANSFORM: {**TRANSFORM_FIELDS, "texCoord": texcoord}}}
        attributes = {"TEXCOORD_0": np.zeros_like(uv), f"TEXCOORD_{texcoord}": uv}
    else:
        info = {"index": texture}
        c, s = np.cos(TRANSFORM_FIELDS["rotation"]), np.sin(TRANSFORM_FIELDS["rotation"])
        scaled = uv * TRANSFORM_FIELDS["scale"]
        rotated = np.stack([c * scaled[:, 0] + s * scaled[:, 1], -s * scaled[:, 0] + c * scaled[:, 1]], 1)
        attributes = {"TEXCOORD_0": (rotated + TRANSFORM_FIELDS["offset"]).astype(np.float32)}
    if spec_gloss:
        g.add((vertices, faces), g.material(extensions={SPEC_GLOSS: {"diffuseTexture": info}}), **attributes)
    else:
        g.add((vertices, faces), g.material(pbrMetallicRoughness={"baseColorTexture": info}), **attributes)
    if transformed:
        g.require(TRANSFORM, *([SPEC_GLOSS] if spec_gloss else []))
    return g.bytes()


def the_object() -> trimesh.Trimesh:
    """The object of the scenery fixtures: a 1 x 1.5 x 0.8 box standing on y = 0."""
    box = trimesh.creation.box(extents=(1.0, 1.5, 0.8))
    box.apply_translation([0.0, 0.75, 0.0])
    return box


def plane(size: float, y: float = 0.0) -> trimesh.Trimesh:
    """A square ground plane of ``size`` at height ``y``, facing up."""
    s = size / 2
    return trimesh.Trimesh([[-s, y, -s], [s, y, -s], [s, y, s], [-s, y, s]], [[0, 2, 1], [0, 3, 2]],
                           process=False)


def skybox(size: float, inward: bool = True, sphere: bool = False) -> trimesh.Trimesh:
    shell = trimesh.creation.icosphere(2, radius=size / 2) if sphere else trimesh.creation.box(extents=[size] * 3)
    if inward:
        shell.invert()
    return shell


def scene_glb(*setting: tuple[str, trimesh.Trimesh], with_object: bool = True) -> bytes:
    """The object (grey) with the given (name, mesh) setting parts (light blue)."""
    g = Gltf()
    if with_object:
        g.add(the_object(), g.material(pbrMetallicRoughness={"baseColorFactor": [0.6, 0.6, 0.6, 1.0]}),
              name="object")
    sky = g.material(pbrMetallicRoughness={"baseColorFactor": [0.5, 0.7, 1.0, 1.0]})
    for name, mesh in setting:
        g.add(mesh, sky, name=name)
    return g.bytes()


def skybox_faces(size: float) -> list[tuple[str, trimesh.Trimesh]]:
    """A skybox made of six separate quads, one node each (as many exporters write it)."""
    box = trimesh.creation.box(extents=[size] * 3)
    box.invert()
    return [(f"sky_{k}", trimesh.Trimesh(box.vertices, box.faces[2 * k:2 * k + 2], process=False))
            for k in range(6)]


# The fixtures as the render sheet shows them: name -> (GLB bytes, what the row should look like).
CASES = {
    "vertex_colors_material": (lambda: vertex_colors_glb(), "left red, right green"),
    "vertex_colors_texture_uint16": (lambda: vertex_colors_glb("uint16", texture=True), "left red, right green"),
    "spec_gloss_palette": (lambda: spec_gloss_glb("P"), "left red, right blue"),
    "alpha_mask": (lambda: alpha_glb("MASK", 0), "left blue, right red"),
    "alpha_blend": (lambda: alpha_glb("BLEND", 128), "left purple, right red"),
    "alpha_blend_no_backdrop": (lambda: alpha_glb("BLEND", 128, backdrop=False), "left pink, right red"),
    "alpha_opaque": (lambda: alpha_glb("OPAQUE", 0), "all red"),
    "texture_transform": (lambda: texture_transform_glb(), "same as the next"),
    "texture_transform_reference": (lambda: texture_transform_glb(False), "same as the previous"),
    "object_skybox": (lambda: scene_glb(("sky", skybox(200.0))), "grey box; sky dropped"),
    "object_ground_plane": (lambda: scene_glb(("ground", plane(168.0))), "grey box; ground dropped"),
    "object_skybox_faces_ground": (lambda: scene_glb(*skybox_faces(300.0), ("ground", plane(168.0))),
                                   "grey box; 7 parts dropped"),
    "only_a_plane": (lambda: scene_glb(("ground", plane(168.0)), with_object=False), "a plane (kept)"),
    "object_outward_shell": (lambda: scene_glb(("shell", skybox(20.0, inward=False, sphere=True))),
                             "error: ambiguous_scene"),
}


# ---------------------------------------------------------------------------- helpers
def write(tmp_path, data: bytes, name: str = "m.glb"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def front_view(path, resolution: int = 32) -> np.ndarray:
    """RGBA [H, W, 4] from the +z camera (image x = world x, image rows = world -y)."""
    return render_views(load_mesh(path, **LIMITS), [(0.0, 0.0)], resolution).images[0]


def left_right(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RGBA at the middle of the image's left and right quarter."""
    h, w = image.shape[:2]
    return image[h // 2, w // 4].astype(int), image[h // 2, 3 * w // 4].astype(int)


def close(pixel: np.ndarray, rgb, tolerance: int = 12) -> bool:
    return bool(np.abs(pixel[:3] - np.asarray(rgb)).max() <= tolerance)


# -------------------------------------------------------------------- vertex colours
@pytest.mark.parametrize("color_type,texture", [("uint8", False), ("float_rgb", False), ("uint16", False),
                                                ("uint8", True), ("uint16", True)])
def test_vertex_colors_multiply_the_material(tmp_path, color_type, texture):
    """COLOR_0 under a white material: the colours show (they were dropped)."""
    left, right = left_right(front_view(write(tmp_path, vertex_colors_glb(color_type, texture))))
    assert close(left, RED) and close(right, GREEN), (left, right)


def test_vertex_colors_times_base_color_factor(tmp_path):
    left, right = left_right(front_view(write(tmp_path, vertex_colors_glb(factor=(0.5, 0.5, 0.5, 1.0)))))
    assert close(left, (128, 0, 0), 6) and close(right, (0, 128, 0), 6), (left, right)


# --------------------------------------------------------------- specular-glossiness
@pytest.mark.parametrize("mode", ["P", "RGB", "RGBA"])
def test_spec_gloss_diffuse_texture_renders_its_colors(tmp_path, mode):
    path = write(tmp_path, spec_gloss_glb(mode))
    assert as_plain_glb(path, LIMITS["max_faces"]) is not None  # rewritten as metallic-roughness
    left, right = left_right(front_view(path))
    assert close(left, RED) and close(right, BLUE), (left, right)


def test_spec_gloss_diffuse_factor_multiplies(tmp_path):
    left, right = left_right(front_view(write(tmp_path, spec_gloss_glb("P", (0.5, 1.0, 1.0, 1.0)))))
    assert close(left, (128, 0, 0), 6) and close(right, BLUE), (left, right)


@pytest.mark.parametrize("mode", ["P", "L", "LA", "I;16", "RGBA", "CMYK"])
def test_texture_array_reads_every_mode_as_8_bit_color(mode):
    colors = np.array([[[200, 30, 90], [10, 250, 128]]], np.uint8)
    image = Image.fromarray(colors)
    if mode in ("L", "LA"):
        image, colors = image.convert(mode), np.asarray(image.convert("L"))[..., None].repeat(3, -1)
    elif mode == "I;16":
        grey = np.asarray(image.convert("L"))
        image, colors = Image.fromarray(grey.astype(np.uint16) * 257), grey[..., None].repeat(3, -1)
        assert image.mode == "I;16"
    elif mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    else:
        image = image.convert(mode)
        colors = np.asarray(image.convert("RGB"))  # CMYK rounds
    rgba = texture_array(image, with_alpha=True)
    assert rgba.shape == (1, 2, 4) and rgba.dtype == np.uint8
    assert np.abs(rgba[..., :3].astype(int) - colors).max() <= 1, rgba
    assert (rgba[..., 3] == 255).all()


def test_palette_transparency_becomes_alpha():
    image = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    image.putpalette([255, 0, 0, 0, 0, 255])
    buf = io.BytesIO()
    image.save(buf, format="PNG", transparency=bytes([0, 255]))  # index 0 fully transparent
    rgba = texture_array(Image.open(buf), with_alpha=True)
    assert rgba.tolist() == [[[255, 0, 0, 0], [0, 0, 255, 255]]]


def test_material_without_base_color_factor_is_white(tmp_path):
    g = Gltf()
    vertices, faces, _ = quad()
    g.add((vertices, faces), g.material(name="default"))
    left, right = left_right(front_view(write(tmp_path, g.bytes())))
    assert close(left, WHITE, 6) and left[3] == 255, left  # (trimesh's main colour is grey 0.4)


# ------------------------------------------------------------------------------ alpha
@pytest.mark.parametrize("alpha_by", ["texture", "vertex_colors"])
def test_alpha_mask_drops_what_is_under_the_cutoff(tmp_path, alpha_by):
    left, right = left_right(front_view(write(tmp_path, alpha_glb("MASK", 0, alpha_by=alpha_by))))
    assert close(left, BLUE, 20) and close(right, RED), (left, right)  # the back quad shows through
    # alpha 0.3 is drawn under a cutoff of 0.2, not under the default 0.5
    left, _ = left_right(front_view(write(tmp_path, alpha_glb("MASK", 77, cutoff=0.2, alpha_by=alpha_by))))
    assert close(left, RED), left
    left, _ = left_right(front_view(write(tmp_path, alpha_glb("MASK", 77, alpha_by=alpha_by))))
    assert close(left, BLUE, 20), left


def test_alpha_mask_over_nothing_is_background(tmp_path):
    left, right = left_right(front_view(write(tmp_path, alpha_glb("MASK", 0, backdrop=False))))
    assert close(left, WHITE, 0) and left[3] == 0 and close(right, RED) and right[3] == 255


def test_alpha_blend_composites_over_what_is_behind(tmp_path):
    left, right = left_right(front_view(write(tmp_path, alpha_glb("BLEND", 128))))
    assert close(left, (128, 0, 127), 12) and left[3] == 255 and close(right, RED), (left, right)
    left, _ = left_right(front_view(write(tmp_path, alpha_glb("BLEND", 128, backdrop=False))))
    assert close(left, (255, 127, 127), 8) and abs(left[3] - 128) <= 1, left  # over the white background


@pytest.mark.parametrize("mode", ["OPAQUE", None])
def test_alpha_opaque_ignores_alpha(tmp_path, mode):
    left, right = left_right(front_view(write(tmp_path, alpha_glb(mode, 0))))
    assert close(left, RED) and close(right, RED) and left[3] == 255, (left, right)


# --------------------------------------------------------------- KHR_texture_transform
def test_uv_transform_matrix_follows_the_extension_example():
    """The extension's example: offset [0, 1], rotation pi/2 and scale 0.5 use "only the
    lower left quadrant of the source image" (v runs down)."""
    matrix = uv_transform_matrix({"offset": [0, 1], "rotation": np.pi / 2, "scale": [0.5, 0.5]})
    corners = np.array([[0, 0, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1]], float) @ matrix.T
    assert np.allclose(np.sort(corners[:, 0]), [0, 0, 0.5, 0.5]) and np.allclose(np.sort(corners[:, 1]),
                                                                                   [0.5, 0.5, 1, 1])


@pytest.mark.parametrize("texcoord,spec_gloss", [(0, False), (1, False), (1, True)])
def test_texture_transform_renders_as_pre_transformed_uvs(tmp_path, texcoord, spec_gloss):
    path = write(tmp_path, texture_transform_glb(True, texcoord, spec_gloss), "t.glb")  # required: not refused
    reference = write(tmp_path, texture_transform_glb(False), "r.glb")
    got, want = load_mesh(path, **LIMITS), load_mesh(reference, **LIMITS)
    assert np.allclose(got.parts[0].visual.uv, want.parts[0].visual.uv, atol=1e-6)
    a, b = front_view(path, 48), front_view(reference, 48)
    assert (a != b).any(-1).mean() < 0.005 and len(np.unique(a.reshape(-1, 4), axis=0)) > 4


def test_texcoord_1_without_transform_is_used(tmp_path):
    g = Gltf()
    vertices, faces, uv = quad()
    texture = g.texture(two_tone(RED, BLUE))
    g.add((vertices, faces), g.material(pbrMetallicRoughness={"baseColorTexture": {"index": texture, "texCoord": 1}}),
          TEXCOORD_0=uv[:, ::-1] * 0 + 0.75, TEXCOORD_1=uv)  # TEXCOORD_0 would be all blue
    left, right = left_right(front_view(write(tmp_path, g.bytes())))
    assert close(left, RED) and close(right, BLUE), (left, right)


def test_texcoord_the_primitive_lacks_is_refused(tmp_path):
    g = Gltf()
    vertices, faces, uv = quad()
    texture = g.texture(two_tone(RED, BLUE))
    g.add((vertices, faces), g.material(pbrMetallicRoughness={"baseColorTexture": {"index": texture, "texCoord": 2}}),
          TEXCOORD_0=uv)
    with pytest.raises(MeshError, match="TEXCOORD_2"):
        load_mesh(write(tmp_path, g.bytes()), **LIMITS)


# ---------------------------------------------------------------------------- scenery
def object_only(tmp_path):
    return load_mesh(write(tmp_path, scene_glb(), "object.glb"), **LIMITS)


@pytest.mark.parametrize("setting,dropped", [
    ([("sky", skybox(200.0))], ["sky"]),
    ([("sky", skybox(500.0, sphere=True))], ["sky"]),
    ([("sky", skybox(500.0, inward=False))], ["sky"]),  # outward, but 100x and more: scenery
    ([("ground", plane(168.0))], ["ground"]),
    ([("ground", plane(168.0, y=-0.01)), ("sky", skybox(2000.0))], ["ground", "sky"]),
    (skybox_faces(300.0) + [("ground", plane(168.0))], [f"sky_{k}" for k in range(6)] + ["ground"]),
])
def test_scenery_is_dropped_and_noted(tmp_path, setting, dropped):
    got = load_mesh(write(tmp_path, scene_glb(*setting)), **LIMITS)
    want = object_only(tmp_path)
    assert np.allclose(got.transform, want.transform) and np.allclose(got.vertices, want.vertices)
    assert len(got.notes) == len(dropped)
    for name, note in zip(sorted(dropped), sorted(got.notes)):
        assert repr(name) in note
    assert np.array_equal(render_views(got, [(20.0, 30.0)], 32).images,
                          render_views(want, [(20.0, 30.0)], 32).images)


def test_scenery_notes_reach_the_row(tmp_path):
    cfg = small_test_config()
    row = process_mesh(write(tmp_path, scene_glb(("sky", skybox(200.0)), ("ground", plane(168.0)))), cfg)
    assert "'sky'" in row["notes"] and "'ground'" in row["notes"] and "skybox" in row["notes"]
    assert np.allclose(row["transform"], object_only(tmp_path).transform)
    batch = rows_to_batch([row], shard_schema(cfg))
    assert batch.column("notes").to_pylist() == [row["notes"]]
    plain = process_mesh(write(tmp_path, scene_glb(), "plain.glb"), cfg)
    assert plain["notes"] is None


@pytest.mark.parametrize("setting", [
    [("ground", plane(168.0))],  # a lone plane
    [("big", trimesh.creation.box(extents=(20.0, 6.0, 8.0),  # a large body, the object a detail on top of it
                                  transform=trimesh.transformations.translation_matrix([0.0, -3.0, 0.0])))],
    [("ground", plane(6.0))],  # a floor a few times the object: not scenery
])
def test_what_is_not_scenery_is_kept(tmp_path, setting):
    with_object = setting[0][0] != "ground" or setting[0][1].extents.max() < 100
    mesh = load_mesh(write(tmp_path, scene_glb(*setting, with_object=with_object)), **LIMITS)
    assert mesh.notes == () and len(mesh.parts) == 1 + with_object


def test_outward_shell_a_few_times_the_rest_is_refused(tmp_path):
    with pytest.raises(MeshError) as e:
        load_mesh(write(tmp_path, scene_glb(("shell", skybox(20.0, inward=False, sphere=True)))), **LIMITS)
    assert e.value.reason_code == "ambiguous_scene" and "'shell'" in e.value.message


def test_notes_column_is_kept_out_of_datasets_written_without_it(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"columns": {"uid": "string"}}))
    assert _keeps_column(tmp_path, [{"file": "shards/shard-00000.parquet"}], "notes") is False
    assert _keeps_column(tmp_path, [], "notes") is True
    assert "notes" not in shard_schema(small_test_config(), with_notes=False).names
