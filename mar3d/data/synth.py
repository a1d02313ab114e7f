"""`mar3d data synth`: a procedural corpus of textured everyday objects, written in the
Objaverse 1.0 layout so that the data job reads it like the real thing.

Why a corpus: a model cannot generalize from 78 scanned objects; it can learn what a
cup or a chair is from thousands of varied instances of a few dozen categories, and the
held-out instances of those categories tell whether it did.

Three families of closed solids, each built with manifold3d (boolean-exact, so every
object is watertight and free of self-intersections by construction):

* **lathe bodies** (a profile revolved about the vertical axis): bottle, can, cup, bowl,
  vase, fruit;
* **extrusions** (a 2D outline pushed along an axis): box, carton, plank, bracket, prism;
* **compositions** (unions of parts): mug, table, chair, hammer, screwdriver, ring.

(One module over ~500 lines on purpose: each category is a short builder of its own, and
a reader compares them side by side; splitting the table of builders would only scatter it.)

Every object gets random proportions within its category's range, a random orientation
about the vertical axis, and a PBR material (base colour texture, metallic, roughness)
with a procedural image texture: stripes, checker, a label band, dots, noise, or a crop
of a photo from ``photo_dir``. Objects are +Y up, as glTF and Objaverse are.

Layout written (the one ``objaverse`` downloads): ``glbs/000-NNN/<uid>.glb``,
``object-paths.json.gz`` {uid: relative path}, ``lvis-annotations.json.gz`` {category:
[uid, ...]}, ``metadata/000-NNN.json.gz`` {uid: {name, license, tags, categories, ...}}.
Object ``i`` of seed ``s`` is the same bytes on every run and machine (its own generator
``default_rng([s, i])``, its uid a hash of both), so a corpus can be grown with a larger
``num_objects`` without changing the objects it already has.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import to_dict

OBJECTS_PER_FOLDER = 1000
LICENSE = "CC0-1.0"
# The ``source`` label of the corpus's rows (its metadata says so), which evaluation uses
# to tell corpus objects from the others of a mixed dataset.
SYNTH_SOURCE = "mar3d-synth"
# What a corpus folder was made with; a folder whose record matches is not made again.
RECORD_FILE = "mar3d-synth.json"


@dataclass
class SynthConfig:
    """What `mar3d data synth` makes (``--set key=value`` on the command line)."""
    num_objects: int = 1000
    seed: int = 0
    # Category names to make (empty = all of CATEGORIES); objects cycle through them, so
    # every category gets the same count (+-1).
    categories: tuple[str, ...] = ()
    texture_size: int = 256
    # A folder of images (PNG/JPG, searched recursively) to cut "photo" textures from;
    # empty = procedural textures only.
    photo_dir: str = ""
    circular_segments: int = 48
    workers: int = 0                 # processes; 0 = one per CPU
    license: str = LICENSE

    def validate(self) -> None:
        if self.num_objects < 1:
            raise ValueError(f"SynthConfig.num_objects must be >= 1, got {self.num_objects}")
        unknown = sorted(set(self.categories) - set(CATEGORIES))
        if unknown:
            raise ValueError(f"unknown synth categories {unknown}; known: {sorted(CATEGORIES)}")
        if not 16 <= self.texture_size <= 4096:
            raise ValueError(f"SynthConfig.texture_size must be in [16, 4096], got {self.texture_size}")
        if not 12 <= self.circular_segments <= 512:
            raise ValueError(f"SynthConfig.circular_segments must be in [12, 512], got {self.circular_segments}")
        if self.photo_dir and not Path(self.photo_dir).is_dir():
            raise ValueError(f"SynthConfig.photo_dir {self.photo_dir!r} is not a folder")
        if self.workers < 0:
            raise ValueError(f"SynthConfig.workers must be >= 0, got {self.workers}")

    def category_list(self) -> list[str]:
        return list(self.categories) if self.categories else sorted(CATEGORIES)


# ------------------------------------------------------------------------------ shapes
# Every builder takes (rng, segments) and returns a Z-up manifold3d.Manifold standing on
# z = 0 and the UV projection that suits it ("cylindrical" or "box").

def _revolve(profile: list[tuple[float, float]], segments: int):
    """Revolve a closed (radius, height) outline about the vertical axis."""
    from manifold3d import CrossSection

    return CrossSection([profile]).revolve(circular_segments=segments)


def _box(sx: float, sy: float, sz: float, at=(0.0, 0.0, 0.0)):
    from manifold3d import Manifold

    return Manifold.cube([sx, sy, sz], center=True).translate(list(at))


def _cylinder(h: float, r: float, segments: int, at=(0.0, 0.0, 0.0), r_top: float = -1.0):
    from manifold3d import Manifold

    return Manifold.cylinder(h, r, r_top, circular_segments=segments).translate(list(at))


def _hollow_profile(outer: list[tuple[float, float]], wall: float, floor: float) -> list[tuple[float, float]]:
    """An open-topped vessel: the outer wall from the axis up to the rim, then the inner
    wall back down (the outer one moved inwards by ``wall``) to a floor ``floor`` thick."""
    inner = [(max(r - wall, 1e-3), max(z, floor)) for r, z in reversed(outer[1:])]
    return [(0.0, 0.0), *outer[1:], *inner, (0.0, floor)]


def bottle(rng, seg):
    r, h = rng.uniform(0.18, 0.3), 1.0
    shoulder = rng.uniform(0.5, 0.7)
    neck = r * rng.uniform(0.3, 0.45)
    return _revolve([(0, 0), (r * 0.95, 0), (r, 0.03), (r, shoulder), (neck, shoulder + rng.uniform(0.12, 0.22)),
                     (neck, h * 0.97), (neck * 1.15, h * 0.97), (neck * 1.15, h), (0, h)], seg), "cylindrical"


def can(rng, seg):
    r, h = rng.uniform(0.28, 0.4), 1.0
    return _revolve([(0, 0), (r * 0.9, 0), (r, 0.04), (r, h - 0.04), (r * 0.9, h), (0, h)], seg), "cylindrical"


def _cup_outer(rng) -> tuple[list[tuple[float, float]], float]:
    top = rng.uniform(0.38, 0.5)
    return [(0, 0), (top * rng.uniform(0.7, 0.85), 0), (top, rng.uniform(0.8, 1.0))], top


def cup(rng, seg):
    outer, top = _cup_outer(rng)
    return _revolve(_hollow_profile(outer, top * rng.uniform(0.08, 0.14), 0.06), seg), "cylindrical"


def bowl(rng, seg):
    top, h = rng.uniform(0.9, 1.1), rng.uniform(0.35, 0.5)
    foot = top * rng.uniform(0.35, 0.5)
    arc = [(foot + (top - foot) * math.sin(t * math.pi / 2), h * (1 - math.cos(t * math.pi / 2)))
           for t in np.linspace(0, 1, 9)]
    return _revolve(_hollow_profile([(0, 0), *arc], top * rng.uniform(0.05, 0.09), 0.05), seg), "cylindrical"


def vase(rng, seg):
    base, belly, neck = rng.uniform(0.15, 0.22), rng.uniform(0.3, 0.42), rng.uniform(0.1, 0.18)
    lip, where = neck * rng.uniform(1.2, 1.6), rng.uniform(0.3, 0.5)
    zs = np.linspace(0, 1, 14)
    radius = np.interp(zs, [0, where, 0.8, 1.0], [base, belly, neck, lip])
    outer = [(0.0, 0.0), *[(float(r), float(z) * 1.3) for r, z in zip(radius, zs)]]
    return _revolve(_hollow_profile(outer, 0.035, 0.06), seg), "cylindrical"


def fruit(rng, seg):
    r, squash, dimple = 0.5, rng.uniform(0.8, 1.0), rng.uniform(0.04, 0.12)
    ts = np.linspace(0, math.pi, 17)
    pts = [(float(r * math.sin(t)), float(r * squash * (1 - math.cos(t)))) for t in ts]
    pts[0], pts[-1] = (0.0, dimple * 0.5), (0.0, 2 * r * squash - dimple)
    return _revolve(pts, seg), "cylindrical"


def box(rng, seg):
    return _box(*rng.uniform(0.6, 1.0, 3)).translate([0, 0, 0.5]), "box"


def carton(rng, seg):
    from manifold3d import CrossSection

    w, h, roof = rng.uniform(0.45, 0.6), 1.0, rng.uniform(0.1, 0.2)
    gable = CrossSection([[(-w / 2, 0), (w / 2, 0), (w / 2, h - roof), (0, h), (-w / 2, h - roof)]])
    depth = w * rng.uniform(0.9, 1.1)
    return gable.extrude(depth).translate([0, 0, -depth / 2]).rotate([90, 0, 0]), "box"


def plank(rng, seg):
    return _box(1.0, rng.uniform(0.12, 0.3), rng.uniform(0.03, 0.08)).translate([0, 0, 0.1]), "box"


def bracket(rng, seg):
    from manifold3d import CrossSection

    a, b, t = 1.0, rng.uniform(0.5, 1.0), rng.uniform(0.08, 0.18)
    ell = CrossSection([[(0, 0), (a, 0), (a, t), (t, t), (t, b), (0, b)]])
    depth = rng.uniform(0.25, 0.6)
    return ell.extrude(depth).translate([-a / 2, -b / 2, 0]), "box"


def prism(rng, seg):
    from manifold3d import CrossSection

    sides = int(rng.choice([3, 5, 6]))
    r = 0.5
    poly = [(r * math.cos(2 * math.pi * k / sides), r * math.sin(2 * math.pi * k / sides)) for k in range(sides)]
    return CrossSection([poly]).extrude(rng.uniform(0.8, 1.6)), "box"


def mug(rng, seg):
    from manifold3d import CrossSection

    outer, top = _cup_outer(rng)
    (_, _), (bottom, _), (_, height) = outer
    body = _revolve(_hollow_profile(outer, top * rng.uniform(0.08, 0.12), 0.06), seg)
    tube, reach = rng.uniform(0.035, 0.055), height * rng.uniform(0.22, 0.3)
    # A half torus in the XZ plane, open towards the body; both ends sink into the wall
    # where the (tapered) wall is narrowest, so the handle always touches the body.
    loop = (CrossSection.circle(tube, 16).translate([reach, 0])
            .revolve(circular_segments=24, revolve_degrees=180).rotate([90, 90, 0]))
    centre = height * 0.5
    wall_at_lower_end = bottom + (top - bottom) * (centre - reach) / height
    return body + loop.translate([wall_at_lower_end - tube * 0.3, 0, centre]), "cylindrical"


def table(rng, seg):
    w, d, h = 1.0, rng.uniform(0.5, 1.0), rng.uniform(0.5, 0.8)
    top_t, leg = rng.uniform(0.04, 0.08), rng.uniform(0.04, 0.08)
    parts = _box(w, d, top_t, (0, 0, h - top_t / 2))
    # Legs reach half-way into the top: solids that only touch stay separate shells in a
    # union (coincident faces inside the table), which no inside test labels right.
    for sx in (-1, 1):
        for sy in (-1, 1):
            parts += _box(leg, leg, h - top_t / 2, (sx * (w / 2 - leg), sy * (d / 2 - leg), (h - top_t / 2) / 2))
    return parts, "box"


def chair(rng, seg):
    w, seat_h, back_h = 0.5, rng.uniform(0.4, 0.5), rng.uniform(0.4, 0.6)
    t, leg = 0.05, rng.uniform(0.035, 0.05)
    parts = _box(w, w, t, (0, 0, seat_h))
    parts += _box(w, t, back_h, (0, -w / 2 + t / 2, seat_h + back_h / 2))
    for sx in (-1, 1):
        for sy in (-1, 1):
            parts += _box(leg, leg, seat_h, (sx * (w / 2 - leg), sy * (w / 2 - leg), seat_h / 2))
    return parts, "box"


def hammer(rng, seg):
    length, r = 1.0, rng.uniform(0.03, 0.05)
    head_w, head = rng.uniform(0.3, 0.45), rng.uniform(0.07, 0.11)
    return (_cylinder(length, r, seg) + _box(head_w, head, head * 1.3, (head_w * 0.1, 0, length - head * 0.5))), "box"


def screwdriver(rng, seg):
    grip_h, grip_r = rng.uniform(0.35, 0.45), rng.uniform(0.07, 0.1)
    shaft_r = grip_r * rng.uniform(0.25, 0.35)
    grip = _cylinder(grip_h, grip_r, seg)
    shaft = _cylinder(1.0 - grip_h, shaft_r, seg, (0, 0, grip_h - 0.01))
    tip = _box(shaft_r * 3, shaft_r * 0.8, 0.06, (0, 0, 1.0 - 0.02))
    return grip + shaft + tip, "cylindrical"


def ring(rng, seg):
    from manifold3d import CrossSection

    tube, radius = rng.uniform(0.06, 0.15), 0.5
    section = CrossSection.circle(tube, 20).scale([1.0, rng.uniform(1.0, 2.0)]).translate([radius, 0])
    return section.revolve(circular_segments=seg).translate([0, 0, tube * 2]), "cylindrical"


CATEGORIES: dict[str, tuple[str, Callable]] = {
    "bottle": ("lathe", bottle), "can": ("lathe", can), "cup": ("lathe", cup), "bowl": ("lathe", bowl),
    "vase": ("lathe", vase), "fruit": ("lathe", fruit),
    "box": ("extrusion", box), "carton": ("extrusion", carton), "plank": ("extrusion", plank),
    "bracket": ("extrusion", bracket), "prism": ("extrusion", prism),
    "mug": ("composition", mug), "table": ("composition", table), "chair": ("composition", chair),
    "hammer": ("composition", hammer), "screwdriver": ("composition", screwdriver),
    "ring": ("composition", ring),
}


# ---------------------------------------------------------------------------- textures
def _palette(rng, n: int) -> np.ndarray:
    """``n`` distinct, saturated-enough colours (uint8 RGB)."""
    hues = (rng.uniform() + np.arange(n) / n + rng.uniform(-0.05, 0.05, n)) % 1.0
    sat, val = rng.uniform(0.35, 0.95, n), rng.uniform(0.35, 0.98, n)
    k = (np.array([5.0, 3.0, 1.0])[None] + hues[:, None] * 6) % 6
    rgb = val[:, None] - val[:, None] * sat[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1)
    return (rgb * 255).astype(np.uint8)


def _photo_files(photo_dir: str) -> list[Path]:
    if not photo_dir:
        return []
    return sorted(p for p in Path(photo_dir).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))


def make_texture(rng, size: int, photos: list[Path]) -> tuple[np.ndarray, str]:
    """(size x size x 3 uint8 image, its kind). ``v`` grows upwards on lathe bodies, so
    bands along the first image axis are horizontal stripes and labels."""
    kinds = ["solid", "stripes", "checker", "label", "dots", "noise"] + (["photo"] * 2 if photos else [])
    kind = str(rng.choice(kinds))
    a, b, c = _palette(rng, 3)
    yy, xx = np.mgrid[0:size, 0:size] / size
    if kind == "photo":
        from PIL import Image

        with Image.open(photos[int(rng.integers(len(photos)))]) as im:
            im = im.convert("RGB")
            side = int(min(im.size) * rng.uniform(0.2, 0.6))
            # Scan texture atlases are mostly black outside their charts: of a few crops,
            # keep the one with the most unused-free (bright) area.
            crops = []
            for _ in range(4):
                x0, y0 = (int(rng.integers(0, max(1, s - side))) for s in im.size)
                crop = np.asarray(im.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.BILINEAR))
                crops.append(crop)
        return max(crops, key=lambda c: float((c.max(-1) > 24).mean())).astype(np.uint8), kind
    if kind == "stripes":
        bands = int(rng.integers(2, 9))
        axis = yy if rng.uniform() < 0.7 else xx
        img = np.where((np.floor(axis * bands) % 2 == 0)[..., None], a, b)
    elif kind == "checker":
        n = int(rng.integers(2, 9))
        img = np.where(((np.floor(xx * n) + np.floor(yy * n)) % 2 == 0)[..., None], a, b)
    elif kind == "label":
        lo = rng.uniform(0.2, 0.45)
        hi = lo + rng.uniform(0.2, 0.4)
        img = np.where(((yy > lo) & (yy < hi))[..., None], b, a)
        for _ in range(int(rng.integers(2, 7))):  # blocks of "print" on the label
            x0, y0 = rng.uniform(0, 0.8), rng.uniform(lo, max(lo, hi - 0.06))
            box_ = (xx > x0) & (xx < x0 + rng.uniform(0.05, 0.2)) & (yy > y0) & (yy < y0 + 0.04)
            img = np.where(box_[..., None], c, img)
    elif kind == "dots":
        n = int(rng.integers(4, 12))
        fx, fy = (xx * n) % 1 - 0.5, (yy * n) % 1 - 0.5
        img = np.where((fx ** 2 + fy ** 2 < rng.uniform(0.02, 0.1))[..., None], b, a)
    elif kind == "noise":
        coarse = rng.uniform(0, 1, (8, 8))
        idx = np.minimum((yy * 8).astype(int), 7), np.minimum((xx * 8).astype(int), 7)
        t = coarse[idx][..., None]
        img = a * (1 - t) + b * t
    else:
        img = np.broadcast_to(a, (size, size, 3))
    grain = rng.normal(0, 6, (size, size, 1))  # printed and painted surfaces are not flat colour
    return np.clip(np.asarray(img, np.float64) + grain, 0, 255).astype(np.uint8), kind


# --------------------------------------------------------------------- mesh + material
def corner_uvs(corners: np.ndarray, mode: str) -> np.ndarray:
    """Per-corner UVs [F, 3, 2] of Z-up triangles ``corners`` [F, 3, 3]. Vertices are not
    shared between triangles, so a triangle crossing the cylindrical seam gets its own
    wrapped ``u`` and box projections can change axis at every edge."""
    lo, hi = corners.reshape(-1, 3).min(0), corners.reshape(-1, 3).max(0)
    span = np.maximum(hi - lo, 1e-9)
    unit = (corners - lo) / span
    if mode == "cylindrical":
        u = np.arctan2(corners[..., 1], corners[..., 0]) / (2 * np.pi) + 0.5
        wraps = (u.max(1) - u.min(1)) > 0.5
        u[wraps] = np.where(u[wraps] < 0.5, u[wraps] + 1.0, u[wraps])
        return np.stack([u, unit[..., 2]], -1)
    normal = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    axis = np.abs(normal).argmax(1)
    keep = np.array([[1, 2], [0, 2], [0, 1]])[axis]  # the two axes the face is seen along
    return np.take_along_axis(unit, keep[:, None, :].repeat(3, 1), axis=2)


def textured_mesh(solid, uv_mode: str, rng, texture_size: int, photos: list[Path], yaw_deg: float):
    """A trimesh with a PBR material: the Z-up ``solid`` turned by ``yaw_deg`` about its
    axis and stood +Y up (glTF)."""
    import trimesh
    from PIL import Image
    from trimesh.visual.material import PBRMaterial

    gl = solid.to_mesh()
    verts = np.asarray(gl.vert_properties, np.float64)[:, :3]
    corners = verts[np.asarray(gl.tri_verts, np.int64)]
    uv = corner_uvs(corners, uv_mode)
    yaw = math.radians(yaw_deg)
    rot = np.array([[math.cos(yaw), -math.sin(yaw), 0], [math.sin(yaw), math.cos(yaw), 0], [0, 0, 1]])
    z_up_to_y_up = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], np.float64)
    flat = corners.reshape(-1, 3) @ (z_up_to_y_up @ rot).T
    image, kind = make_texture(rng, texture_size, photos)
    metallic = float(rng.choice([0.0, rng.uniform(0.0, 0.3), rng.uniform(0.7, 1.0)], p=[0.5, 0.35, 0.15]))
    # JPEG, as most Objaverse textures are: a tenth of the bytes of PNG for these images.
    encoded = io.BytesIO()
    Image.fromarray(image).save(encoded, "JPEG", quality=90)
    texture = Image.open(io.BytesIO(encoded.getvalue()))
    texture.load()
    material = PBRMaterial(baseColorTexture=texture, metallicFactor=metallic,
                           roughnessFactor=float(rng.uniform(0.3, 0.9)), doubleSided=False)
    faces = np.arange(len(flat)).reshape(-1, 3)
    visual = trimesh.visual.TextureVisuals(uv=uv.reshape(-1, 2), material=material)
    mesh = trimesh.Trimesh(flat, faces, visual=visual, process=False)
    return mesh, {"texture": kind, "metallic": round(metallic, 3)}


# ----------------------------------------------------------------------------- objects
def object_uid(seed: int, index: int) -> str:
    """32 hex digits, like Objaverse's uids; a pure function of (seed, index)."""
    return hashlib.sha256(f"mar3d-synth:{seed}:{index}".encode()).hexdigest()[:32]


def folder_of(index: int) -> str:
    return f"000-{index // OBJECTS_PER_FOLDER:03d}"


def make_object(index: int, cfg: SynthConfig, photos: list[Path]) -> tuple[bytes, dict]:
    """(GLB bytes, metadata record) of object ``index``."""
    categories = cfg.category_list()
    category = categories[index % len(categories)]
    family, build = CATEGORIES[category]
    rng = np.random.default_rng([cfg.seed, index])
    solid, uv_mode = build(rng, cfg.circular_segments)
    yaw = float(rng.uniform(0, 360))
    mesh, look = textured_mesh(solid, uv_mode, rng, cfg.texture_size, photos, yaw)
    glb = mesh.export(file_type="glb")
    uid = object_uid(cfg.seed, index)
    record = {"uid": uid, "name": f"{category} {index:05d}", "license": cfg.license,
              "source": SYNTH_SOURCE,
              "categories": [category], "tags": [{"name": category}, {"name": family}],
              "description": f"procedural {category} ({family}) made by mar3d data synth",
              "faceCount": int(len(mesh.faces)),
              "mar3d_synth": {"seed": cfg.seed, "index": index, "family": family, "yaw_deg": round(yaw, 2),
                              "watertight": True, **look}}
    return glb, record


def _write_chunk(args: tuple[list[int], dict, str]) -> list[dict]:
    indices, cfg_dict, root = args
    from ..config import from_dict

    cfg = from_dict(SynthConfig, cfg_dict)
    photos = _photo_files(cfg.photo_dir)
    records = []
    for index in indices:
        glb, record = make_object(index, cfg, photos)
        rel = f"glbs/{folder_of(index)}/{record['uid']}.glb"
        path = Path(root) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".glb.tmp")
        tmp.write_bytes(glb)
        os.replace(tmp, path)
        records.append({**record, "path": rel})
    return records


def _write_json_gz(path: Path, doc) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # mtime=0: the same corpus gives the same bytes.
    with gzip.GzipFile(tmp, "wb", mtime=0) as f:
        f.write(json.dumps(doc, sort_keys=True).encode())
    os.replace(tmp, path)


@dataclass
class SynthResult:
    output: str
    num_objects: int
    categories: dict[str, int]
    seconds: float

    def summary(self) -> str:
        rate = self.num_objects / max(self.seconds, 1e-9) * 60
        return (f"synth: {self.num_objects} objects in {len(self.categories)} categories -> {self.output} "
                f"({self.seconds:.1f} s, {rate:.0f} objects/min)")


def synthesize(output: str | Path, cfg: SynthConfig | None = None, progress: bool = True) -> SynthResult:
    """Write the corpus of ``cfg`` to ``output`` in the Objaverse 1.0 layout (see the
    module doc). Objects already there are written again (same bytes); the index files
    are replaced last, atomically, so a reader never sees a uid without its file."""
    from ..logs import progress_bar

    cfg = cfg or SynthConfig()
    cfg.validate()
    root = Path(output)
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    workers = cfg.workers or os.cpu_count() or 1
    chunk = max(1, min(64, cfg.num_objects // (workers * 4) or 1))
    jobs = [(list(range(i, min(i + chunk, cfg.num_objects))), to_dict(cfg), str(root))
            for i in range(0, cfg.num_objects, chunk)]
    records: list[dict] = []
    bar = progress_bar(cfg.num_objects, "synth", "obj", enabled=progress)
    try:
        with ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
            for done in (pool.map if pool else map)(_write_chunk, jobs):
                records.extend(done)
                bar.update(len(done))
    finally:
        bar.close()
    write_index(root, records)
    counts = dict(Counter(r["categories"][0] for r in records))
    _write_record(root, cfg, counts)
    return SynthResult(str(root), len(records), counts, time.perf_counter() - start)


def _corpus_identity(cfg: SynthConfig) -> dict:
    """The settings that decide a corpus's bytes (not how many processes made it)."""
    return {k: v for k, v in to_dict(cfg).items() if k != "workers"}


def _write_record(root: Path, cfg: SynthConfig, counts: dict[str, int]) -> None:
    tmp = root / (RECORD_FILE + ".tmp")
    tmp.write_text(json.dumps({"config": _corpus_identity(cfg), "categories": counts},
                              indent=2, sort_keys=True))
    os.replace(tmp, root / RECORD_FILE)


def ensure_corpus(output: str | Path, cfg: SynthConfig, progress: bool = True) -> SynthResult | None:
    """Make the corpus of ``cfg`` at ``output`` unless that folder already holds it (its
    record, written last, names the same settings); returns None when nothing was made.
    A folder holding a corpus of other settings (seed, categories, textures) is refused
    rather than mixed with this one; one of another size is regrown."""
    root = Path(output)
    record = root / RECORD_FILE
    if record.is_file():
        made = json.loads(record.read_text()).get("config") or {}
        wanted = _corpus_identity(cfg)
        if made == wanted:
            return None
        # Only the count differs: object i is the same file in both, so the corpus grows
        # (or its index shrinks) in place.
        if {k: v for k, v in made.items() if k != "num_objects"} != \
                {k: v for k, v in wanted.items() if k != "num_objects"}:
            raise ValueError(f"{root} holds a corpus made with other settings ({made}); "
                             f"this run asks for {wanted}: use another folder")
        return synthesize(root, cfg, progress)
    if root.is_dir() and any(root.iterdir()) and not (root / "glbs").is_dir():
        raise ValueError(f"{root} is not empty and holds no corpus: refusing to write one into it")
    return synthesize(root, cfg, progress)


def write_index(root: Path, records: list[dict]) -> None:
    """object-paths, LVIS-style category lists and per-folder metadata, as Objaverse 1.0."""
    by_folder: dict[str, dict] = {}
    lvis: dict[str, list[str]] = {}
    for r in records:
        meta = {k: v for k, v in r.items() if k != "path"}
        by_folder.setdefault(Path(r["path"]).parent.name, {})[r["uid"]] = meta
        lvis.setdefault(r["categories"][0], []).append(r["uid"])
    for folder, doc in by_folder.items():
        _write_json_gz(root / "metadata" / f"{folder}.json.gz", doc)
    _write_json_gz(root / "lvis-annotations.json.gz", {k: sorted(v) for k, v in lvis.items()})
    _write_json_gz(root / "object-paths.json.gz", {r["uid"]: r["path"] for r in records})


__all__ = ["CATEGORIES", "SYNTH_SOURCE", "SynthConfig", "SynthResult", "ensure_corpus", "make_object",
           "object_uid", "synthesize"]
