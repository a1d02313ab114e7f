"""Condition images without Blender: Embree ray casting + texture lookup + Lambert shading.

One primary ray per pixel is cast (trimesh's Embree intersector) against the ORIGINAL
normalized mesh, not the watertight one, so textures and thin details stay as authored.
The albedo at a hit comes from the hit part's texture sampled at the UV interpolated with
the hit's barycentric coordinates (glTF baseColorTexture x baseColorFactor, or an OBJ
map_Kd image), else from interpolated vertex colours, face colours or the material's main
colour. Shading is a head-light Lambert term plus ambient, two-sided (many assets have
flipped faces). Alpha is the hit mask; the background is white (or black) with alpha 0.

Cameras follow the OpenCV convention: x right, y down, z forward;
``world_to_cam`` maps normalized mesh coordinates to camera coordinates and
``intrinsics`` maps camera coordinates to pixels (pixel centres at +0.5).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import trimesh
from trimesh.ray.ray_pyembree import RayMeshIntersector
from trimesh.visual.material import PBRMaterial

from .mesh_io import LoadedMesh

DEFAULT_GREY = np.array([0.7, 0.7, 0.7])


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


class _PartShader:
    """Albedo lookup for one scene part (texture, vertex/face colours or material colour)."""

    def __init__(self, part: trimesh.Trimesh):
        self.faces = np.asarray(part.faces)
        self.texture = None
        self.uv = None
        self.factor = np.ones(3)
        self.vertex_colors = None
        self.face_colors = None
        self.flat = DEFAULT_GREY
        visual = part.visual
        if isinstance(visual, trimesh.visual.TextureVisuals):
            material = visual.material
            image = None
            if isinstance(material, PBRMaterial):
                image = material.baseColorTexture
                if material.baseColorFactor is not None:
                    self.factor = np.asarray(material.baseColorFactor[:3], np.float64) / 255.0
            elif material is not None:
                image = getattr(material, "image", None)
            if image is not None and visual.uv is not None and len(visual.uv) == len(part.vertices):
                # uint8 stays uint8: a 4096^2 map as float64 would cost 400 MB and 0.3 s.
                self.texture = np.asarray(image.convert("RGB"))
                self.uv = np.asarray(visual.uv, np.float64)
            elif material is not None:
                self.flat = np.asarray(material.main_color[:3], np.float64) / 255.0
        elif isinstance(visual, trimesh.visual.ColorVisuals) and visual.defined:
            if visual.kind == "vertex":
                self.vertex_colors = np.asarray(visual.vertex_colors[:, :3], np.float64) / 255.0
            elif visual.kind == "face":
                self.face_colors = np.asarray(visual.face_colors[:, :3], np.float64) / 255.0

    def albedo(self, local_faces: np.ndarray, bary: np.ndarray) -> np.ndarray:
        tri = self.faces[local_faces]
        if self.texture is not None:
            uv = np.einsum("nk,nkd->nd", bary, self.uv[tri])
            h, w = self.texture.shape[:2]
            # Wrap (glTF REPEAT default); v points up in UV space, rows go down.
            x = np.floor(np.mod(uv[:, 0], 1.0) * w).astype(np.int64).clip(0, w - 1)
            y = np.floor((1.0 - np.mod(uv[:, 1], 1.0)) * h).astype(np.int64).clip(0, h - 1)
            return self.texture[y, x] / 255.0 * self.factor
        if self.vertex_colors is not None:
            return np.einsum("nk,nkd->nd", bary, self.vertex_colors[tri])
        if self.face_colors is not None:
            return self.face_colors[local_faces]
        return np.broadcast_to(self.flat, (len(local_faces), 3))


def render_views(mesh: LoadedMesh, angles: list[tuple[float, float]], resolution: int,
                 fov_deg: float = 40.0, fit_margin: float = 1.1, ambient: float = 0.35,
                 white_background: bool = True, up_axis: str = "y") -> Renders:
    """RGBA renders of ``mesh`` from each (elevation, azimuth) in ``angles``."""
    geometry = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    intersector = RayMeshIntersector(geometry)
    shaders = [_PartShader(p) for p in mesh.parts]
    vertex_normals = geometry.vertex_normals
    radius = float(np.linalg.norm(mesh.vertices[np.unique(mesh.faces)], axis=1).max())
    distance = radius / np.sin(np.radians(fov_deg) / 2.0) * fit_margin
    k = intrinsics_matrix(resolution, fov_deg)
    background = 1.0 if white_background else 0.0
    num_pixels = resolution * resolution

    cams, origins, dirs = [], [], []
    for elev, azim in angles:
        w2c = look_at(elev, azim, distance, up_axis)
        o, d = camera_rays(w2c, k, resolution)
        cams.append(w2c)
        origins.append(o)
        dirs.append(d)
    origins, dirs = np.concatenate(origins), np.concatenate(dirs)
    # All views in one Embree call: per-call overhead dominates at small resolutions.
    tri, ray, loc = intersector.intersects_id(origins, dirs, multiple_hits=False, return_locations=True)

    rgb = np.full((len(angles) * num_pixels, 3), background)
    alpha = np.zeros(len(angles) * num_pixels)
    if len(tri):
        bary = trimesh.triangles.points_to_barycentric(geometry.triangles[tri], loc)
        bary = np.clip(np.nan_to_num(bary, nan=1.0 / 3.0), 0.0, 1.0)
        bary /= np.maximum(bary.sum(1, keepdims=True), 1e-12)
        part = mesh.face_part[tri]
        albedo = np.empty((len(tri), 3))
        for p in np.unique(part):
            sel = part == p
            albedo[sel] = shaders[p].albedo(tri[sel] - mesh.face_offset[p], bary[sel])
        normals = np.einsum("nk,nkd->nd", bary, vertex_normals[geometry.faces[tri]])
        normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
        lambert = np.abs((normals * dirs[ray]).sum(1))
        rgb[ray] = albedo * (ambient + (1.0 - ambient) * lambert)[:, None]
        alpha[ray] = 1.0
    image = np.concatenate([rgb, alpha[:, None]], 1).reshape(len(angles), resolution, resolution, 4)
    return Renders(images=np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8),
                   world_to_cam=np.stack(cams).astype(np.float32),
                   intrinsics=np.repeat(k[None], len(angles), 0).astype(np.float32),
                   elev_azim=np.asarray(angles, np.float32))
