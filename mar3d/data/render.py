"""Condition images without Blender: Embree ray casting + texture lookup + Lambert shading.

One primary ray per pixel is cast (trimesh's Embree intersector) against the ORIGINAL
normalized mesh, not the watertight one, so textures and thin details stay as authored.
The albedo at a hit comes from the hit part's texture sampled at the UV interpolated with
the hit's barycentric coordinates (glTF baseColorTexture x baseColorFactor x COLOR_0, or
an OBJ map_Kd image), else from interpolated vertex colours, face colours or the
material's main colour. glTF alpha modes are honoured: MASK texels under the cutoff are
not drawn and BLEND surfaces are composited over what lies behind them (the ray goes on
past such hits). Shading is a head-light Lambert term plus ambient, two-sided (many
assets have flipped faces). Alpha is the coverage (1 where an opaque surface was hit);
the background is white (or black) with alpha 0.

Cameras follow the OpenCV convention: x right, y down, z forward;
``world_to_cam`` maps normalized mesh coordinates to camera coordinates and
``intrinsics`` maps camera coordinates to pixels (pixel centres at +0.5).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import trimesh
from trimesh.ray.ray_pyembree import RayMeshIntersector
from PIL import Image
from trimesh.visual.material import PBRMaterial

from .mesh_io import LoadedMesh

DEFAULT_GREY = np.array([0.7, 0.7, 0.7])
MAX_LAYERS = 8  # see-through surfaces (masked texels, blended ones) a ray passes before it stops
_STEP_PAST_HIT = 1e-4  # normalized units: past a see-through hit without skipping what lies behind


@dataclass
class Renders:
    images: np.ndarray  # uint8 [V,H,W,4]
    world_to_cam: np.ndarray  # float32 [V,4,4]
    intrinsics: np.ndarray  # float32 [V,3,3]
    elev_azim: np.ndarray  # float32 [V,2] degrees


def look_at(elevation_deg: float, azimuth_deg: float, distance: float, up_axis: str = "y") -> np.ndarray:
    """world_to_cam [4,4] for a camera on a sphere around the origin looking at it."""
    e, a = np.radians(elevation_deg), np.radians(azimuth_deg)
    if up_axis == "y":
        position = distance * np.array([np.cos(e) * np.sin(a), np.sin(e), np.cos(e) * np.cos(a)])
        up = np.array([0.0, 1.0, 0.0])
    else:
        position = distance * np.array([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)])
        up = np.array([0.0, 0.0, 1.0])
    forward = -position / np.linalg.norm(position)
    right = np.cross(forward, up)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    rot = np.stack([right, down, forward])
    w2c = np.eye(4)
    w2c[:3, :3] = rot
    w2c[:3, 3] = -rot @ position
    return w2c


def intrinsics_matrix(resolution: int, fov_deg: float) -> np.ndarray:
    f = (resolution / 2.0) / np.tan(np.radians(fov_deg) / 2.0)
    return np.array([[f, 0.0, resolution / 2.0], [0.0, f, resolution / 2.0], [0.0, 0.0, 1.0]])


def camera_rays(w2c: np.ndarray, k: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel (origins, unit directions) in world coordinates, row-major pixels."""
    j, i = np.meshgrid(np.arange(resolution) + 0.5, np.arange(resolution) + 0.5)
    dirs_cam = np.stack([(j - k[0, 2]) / k[0, 0], (i - k[1, 2]) / k[1, 1], np.ones_like(i)], -1).reshape(-1, 3)
    rot = w2c[:3, :3]
    dirs = dirs_cam @ rot  # = (rot.T @ d.T).T
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    origin = -rot.T @ w2c[:3, 3]
    return np.broadcast_to(origin, dirs.shape).copy(), dirs


def texture_array(image, with_alpha: bool) -> np.ndarray:
    """uint8 [H, W, 4 or 3] of a PIL image of any mode. Palette ("P", its transparency
    included), grey ("L", "LA") and CMYK convert as they are; 16-bit grey ("I;16", "I")
    is scaled to 8 bits first, because PIL's own conversion clips it (every value above
    255 becomes white)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        grey = np.asarray(image, np.float64) / 257.0
        image = Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.round(np.asarray(image) * 255.0), 0, 255).astype(np.uint8), "L")
    return np.asarray(image.convert("RGBA" if with_alpha else "RGB"))


def unit_colors(colors) -> np.ndarray:
    """float64 [N, 4] in [0, 1] of vertex colours as trimesh keeps them: uint8 (0-255,
    also what a glTF normalized uint8 accessor arrives as), uint16 or float; RGB gets
    alpha 1."""
    c = np.asarray(colors)
    c = c.reshape(len(c), -1)
    if c.dtype.kind in "ui":
        c = c / float(np.iinfo(c.dtype).max if c.dtype.itemsize <= 2 else 255)
    c = np.clip(np.nan_to_num(c.astype(np.float64)), 0.0, 1.0)
    if c.shape[1] == 3:
        c = np.concatenate([c, np.ones((len(c), 1))], axis=1)
    return c[:, :4]


class _PartShader:
    """Base colour and coverage of one scene part at ray hits.

    glTF (PBRMaterial): base colour = baseColorFactor x baseColorTexture x COLOR_0, RGBA
    (glTF 2.0, 3.9.2; a material without a factor is white); its alpha decides the
    coverage by alphaMode: OPAQUE ignores it, MASK draws where alpha >= alphaCutoff
    (default 0.5) and nothing elsewhere, BLEND covers by alpha. Other materials (OBJ):
    the texture, else the material colour, opaque. No material: vertex or face colours,
    else grey, opaque."""

    def __init__(self, part: trimesh.Trimesh):
        self.faces = np.asarray(part.faces)
        self.texture = None  # uint8 [H, W, 3 or 4]
        self.uv = None
        self.factor = np.ones(4)
        self.vertex_colors = None  # float [V, 4]
        self.face_colors = None  # float [F, 4]
        self.alpha_mode = "OPAQUE"
        self.alpha_cutoff = 0.5
        self.flat = np.append(DEFAULT_GREY, 1.0)  # the colour without texture and vertex colours
        visual = part.visual
        if isinstance(visual, trimesh.visual.TextureVisuals):
            material = visual.material
            if isinstance(material, PBRMaterial):
                self._gltf_material(material, visual, len(part.vertices))
            elif material is not None:
                image = getattr(material, "image", None)
                if image is not None and visual.uv is not None and len(visual.uv) == len(part.vertices):
                    self._set_texture(image, visual.uv)
                else:
                    self.flat = np.asarray(material.main_color, np.float64) / 255.0
                    self.flat[3] = 1.0
        elif isinstance(visual, trimesh.visual.ColorVisuals) and visual.defined:
            if visual.kind == "vertex":
                self.vertex_colors = unit_colors(visual.vertex_colors)
            elif visual.kind == "face":
                self.face_colors = unit_colors(visual.face_colors)

    def _gltf_material(self, material: PBRMaterial, visual, num_vertices: int) -> None:
        if material.baseColorFactor is not None:
            self.factor = unit_colors(np.asarray(material.baseColorFactor)[None])[0]
        self.flat = np.ones(4)
        self.alpha_mode = material.alphaMode or "OPAQUE"
        if material.alphaCutoff is not None:
            self.alpha_cutoff = float(material.alphaCutoff)
        image = material.baseColorTexture
        if image is not None and visual.uv is not None and len(visual.uv) == num_vertices:
            self._set_texture(image, visual.uv)
        colors = visual.vertex_attributes.get("color")
        if colors is not None and len(colors) == num_vertices:
            self.vertex_colors = unit_colors(colors)

    def _set_texture(self, image, uv) -> None:
        # uint8 stays uint8: a 4096^2 map as float64 would cost 400 MB and 0.3 s.
        self.texture = texture_array(image, with_alpha=self.alpha_mode != "OPAQUE")
        self.uv = np.asarray(uv, np.float64)

    def shade(self, local_faces: np.ndarray, bary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(base colour RGB [n, 3], coverage [n] in [0, 1]) at the hits."""
        tri = self.faces[local_faces]
        color = np.broadcast_to(self.factor, (len(local_faces), 4))
        if self.texture is not None:
            color = color * self._texels(np.einsum("nk,nkd->nd", bary, self.uv[tri]))
        else:
            color = color * self.flat
        if self.vertex_colors is not None:
            color = color * np.einsum("nk,nkd->nd", bary, self.vertex_colors[tri])
        if self.face_colors is not None:
            color = color * self.face_colors[local_faces]
        return color[:, :3], self._coverage(color[:, 3])

    def _texels(self, uv: np.ndarray) -> np.ndarray:
        h, w = self.texture.shape[:2]
        # Wrap (glTF REPEAT default); v points up in UV space, rows go down.
        x = np.floor(np.mod(uv[:, 0], 1.0) * w).astype(np.int64).clip(0, w - 1)
        y = np.floor((1.0 - np.mod(uv[:, 1], 1.0)) * h).astype(np.int64).clip(0, h - 1)
        texels = self.texture[y, x] / 255.0
        if texels.shape[1] == 3:
            texels = np.concatenate([texels, np.ones((len(texels), 1))], axis=1)
        return texels

    def _coverage(self, alpha: np.ndarray) -> np.ndarray:
        if self.alpha_mode == "MASK":
            return (alpha >= self.alpha_cutoff).astype(np.float64)
        if self.alpha_mode == "BLEND":
            return np.clip(alpha, 0.0, 1.0)
        return np.ones(len(alpha))


def _trace(intersector, geometry: trimesh.Trimesh, mesh: LoadedMesh, shaders: list[_PartShader],
           origins: np.ndarray, dirs: np.ndarray, ambient: float) -> tuple[np.ndarray, np.ndarray]:
    """(shaded colour [R, 3] accumulated front to back, transmittance [R]: the fraction
    of the background still seen, 1 where nothing was hit) of every ray. A ray ends at an
    opaque hit; at a MASK texel under the cutoff or a BLEND surface it goes on from just
    past the hit, up to ``MAX_LAYERS`` surfaces. An opaque mesh costs one Embree call,
    as before: all views in one call, since per-call overhead dominates at small
    resolutions."""
    color = np.zeros((len(dirs), 3))
    transmittance = np.ones(len(dirs))
    active, starts = np.arange(len(dirs)), origins
    vertex_normals = geometry.vertex_normals
    for _ in range(MAX_LAYERS):
        tri, hit, loc = intersector.intersects_id(starts, dirs[active], multiple_hits=False,
                                                  return_locations=True)
        if not len(tri):
            break
        ray = active[hit]
        bary = trimesh.triangles.points_to_barycentric(geometry.triangles[tri], loc)
        bary = np.clip(np.nan_to_num(bary, nan=1.0 / 3.0), 0.0, 1.0)
        bary /= np.maximum(bary.sum(1, keepdims=True), 1e-12)
        part = mesh.face_part[tri]
        albedo, coverage = np.empty((len(tri), 3)), np.empty(len(tri))
        for p in np.unique(part):
            sel = part == p
            albedo[sel], coverage[sel] = shaders[p].shade(tri[sel] - mesh.face_offset[p], bary[sel])
        normals = np.einsum("nk,nkd->nd", bary, vertex_normals[geometry.faces[tri]])
        normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
        lambert = np.abs((normals * dirs[ray]).sum(1))
        shaded = albedo * (ambient + (1.0 - ambient) * lambert)[:, None]
        color[ray] += (transmittance[ray] * coverage)[:, None] * shaded
        transmittance[ray] *= 1.0 - coverage
        go_on = (coverage < 1.0) & (transmittance[ray] > 1.0 / 512)
        active = ray[go_on]
        if not len(active):
            break
        starts = loc[go_on] + dirs[active] * _STEP_PAST_HIT
    return color, transmittance


def render_views(mesh: LoadedMesh, angles: list[tuple[float, float]], resolution: int,
                 fov_deg: float = 40.0, fit_margin: float = 1.1, ambient: float = 0.35,
                 white_background: bool = True, up_axis: str = "y") -> Renders:
    """RGBA renders of ``mesh`` from each (elevation, azimuth) in ``angles``."""
    geometry = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    intersector = RayMeshIntersector(geometry)
    shaders = [_PartShader(p) for p in mesh.parts]
    radius = float(np.linalg.norm(mesh.vertices[np.unique(mesh.faces)], axis=1).max())
    distance = radius / np.sin(np.radians(fov_deg) / 2.0) * fit_margin
    k = intrinsics_matrix(resolution, fov_deg)
    background = 1.0 if white_background else 0.0

    cams, origins, dirs = [], [], []
    for elev, azim in angles:
        w2c = look_at(elev, azim, distance, up_axis)
        o, d = camera_rays(w2c, k, resolution)
        cams.append(w2c)
        origins.append(o)
        dirs.append(d)
    origins, dirs = np.concatenate(origins), np.concatenate(dirs)
    color, transmittance = _trace(intersector, geometry, mesh, shaders, origins, dirs, ambient)
    rgb = color + transmittance[:, None] * background
    alpha = 1.0 - transmittance
    image = np.concatenate([rgb, alpha[:, None]], 1).reshape(len(angles), resolution, resolution, 4)
    return Renders(images=np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8),
                   world_to_cam=np.stack(cams).astype(np.float32),
                   intrinsics=np.repeat(k[None], len(angles), 0).astype(np.float32),
                   elev_azim=np.asarray(angles, np.float32))
