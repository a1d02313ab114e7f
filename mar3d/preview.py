"""Normal-map previews of generated and ground-truth shapes from one camera.

A generated shape is a mesh, rendered by Embree ray casting (one primary ray per pixel,
interpolated vertex normals at the hit). The ground truth of a prepared dataset is a
set of surface points with normals (``surface_0``), rendered by z-buffered point
splatting: every point covers a small screen-space disk sized from the point spacing,
and the nearest point wins each pixel. Both use the OpenCV camera convention of
``mar3d.data.render`` (x right, y down, z forward), so the dataset's stored condition
camera shows both shapes exactly as the input image shows the object.

Colours follow the usual normal-map convention in *view space* (x right, y up, z
towards the viewer): ``rgb = (n + 1) / 2``, so a surface facing the camera is
(128, 128, 255). Normals are made to face the camera (two-sided), because generated
meshes may have flipped faces and point normals on thin parts may point away. The
background is transparent (alpha 0).
"""
from __future__ import annotations

import numpy as np
import trimesh
from scipy.spatial import cKDTree

from mar3d.data.render import camera_rays

# OpenCV camera (y down, z forward) -> view space of normal maps (y up, z to the viewer).
_CV_TO_VIEW = np.array([1.0, -1.0, -1.0])
_SPLAT_CHUNK = 4096


def scaled_intrinsics(intrinsics: np.ndarray, from_resolution: int, to_resolution: int) -> np.ndarray:
    """Intrinsics of the same camera for a square image of another size."""
    k = np.asarray(intrinsics, np.float64).copy()
    k[:2] *= to_resolution / from_resolution
    return k


def _to_camera(world_to_cam: np.ndarray, points: np.ndarray) -> np.ndarray:
    w2c = np.asarray(world_to_cam, np.float64)
    return points @ w2c[:3, :3].T + w2c[:3, 3]


def _facing_camera(normals_cam: np.ndarray, view_dirs_cam: np.ndarray) -> np.ndarray:
    """Flip normals that point away from the viewer (two-sided shading)."""
    n = normals_cam / np.maximum(np.linalg.norm(normals_cam, axis=-1, keepdims=True), 1e-12)
    away = (n * view_dirs_cam).sum(-1) > 0
    n[away] *= -1.0
    return n


def mesh_normals(mesh: trimesh.Trimesh, world_to_cam: np.ndarray, intrinsics: np.ndarray,
                 resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Camera-space unit normals [H, W, 3] (OpenCV axes) and hit mask [H, W] of ``mesh``."""
    normals = np.zeros((resolution * resolution, 3))
    mask = np.zeros(resolution * resolution, bool)
    if len(mesh.faces) == 0:
        return normals.reshape(resolution, resolution, 3), mask.reshape(resolution, resolution)
    from trimesh.ray.ray_pyembree import RayMeshIntersector

    geometry = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    origins, dirs = camera_rays(np.asarray(world_to_cam, np.float64), np.asarray(intrinsics, np.float64),
                                resolution)
    tri, ray, loc = RayMeshIntersector(geometry).intersects_id(
        origins, dirs, multiple_hits=False, return_locations=True)
    if len(tri):
        bary = trimesh.triangles.points_to_barycentric(geometry.triangles[tri], loc)
        bary = np.clip(np.nan_to_num(bary, nan=1.0 / 3.0), 0.0, 1.0)
        bary /= np.maximum(bary.sum(1, keepdims=True), 1e-12)
        world = np.einsum("nk,nkd->nd", bary, geometry.vertex_normals[geometry.faces[tri]])
        # Degenerate interpolations (opposite vertex normals on thin sheets) fall back
        # to the face normal.
        weak = np.linalg.norm(world, axis=1) < 1e-6
        world[weak] = geometry.face_normals[tri[weak]]
        rot = np.asarray(world_to_cam, np.float64)[:3, :3]
        normals[ray] = _facing_camera(world @ rot.T, dirs[ray] @ rot.T)
        mask[ray] = True
    return normals.reshape(resolution, resolution, 3), mask.reshape(resolution, resolution)


def point_spacing(points: np.ndarray) -> float:
    """Median nearest-neighbour distance: the scale a splat must cover to close gaps."""
    if len(points) < 2:
        return 0.0
    distances, _ = cKDTree(points).query(points, k=2)
    return float(np.median(distances[:, 1]))


def splat_normals(points: np.ndarray, normals: np.ndarray, world_to_cam: np.ndarray,
                  intrinsics: np.ndarray, resolution: int, splat_scale: float = 2.0,
                  max_radius_px: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Z-buffered point splatting: camera-space normals [H, W, 3] and mask [H, W].

    Each point covers a disk of radius ``splat_scale * spacing * f / depth`` pixels (at
    least one pixel, at most ``max_radius_px``), where ``spacing`` is the median
    nearest-neighbour distance of the points. Random samples leave gaps about twice
    their median spacing, hence the default scale of 2: the surface renders closed and
    hidden points stay hidden behind it, at the cost of silhouettes about one splat
    radius too wide."""
    points = np.asarray(points, np.float64)
    normals = np.asarray(normals, np.float64)
    if points.ndim != 2 or points.shape[1] != 3 or normals.shape != points.shape:
        raise ValueError("points and normals must both be [N, 3]")
    if splat_scale <= 0 or max_radius_px < 0:
        raise ValueError("splat_scale must be > 0 and max_radius_px >= 0")
    out_normals = np.zeros((resolution * resolution, 3))
    mask = np.zeros(resolution * resolution, bool)
    cam = _to_camera(world_to_cam, points)
    front = cam[:, 2] > 1e-6
    if not front.any():
        return out_normals.reshape(resolution, resolution, 3), mask.reshape(resolution, resolution)
    k = np.asarray(intrinsics, np.float64)
    cam, world_normals = cam[front], normals[front]
    depth = cam[:, 2]
    u = k[0, 0] * cam[:, 0] / depth + k[0, 2]
    v = k[1, 1] * cam[:, 1] / depth + k[1, 2]
    radius = np.clip(splat_scale * point_spacing(points) * k[0, 0] / depth, 0.5, max_radius_px)
    rot = np.asarray(world_to_cam, np.float64)[:3, :3]
    cam_normals = _facing_camera(world_normals @ rot.T, cam / np.linalg.norm(cam, axis=1, keepdims=True))

    # All (point, pixel) pairs inside each point's disk (in chunks of points to bound the
    # memory of the candidate offsets), then one z-buffer pass: a minimum per pixel, and
    # the points attaining it write their normal.
    reach = int(np.ceil(radius.max()))
    offsets = np.array([(dx, dy) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)])
    own_pixel = (offsets[:, 0] == 0) & (offsets[:, 1] == 0)
    pixel_parts, index_parts = [], []
    for start in range(0, len(u), _SPLAT_CHUNK):
        cu, cv, cr = (a[start:start + _SPLAT_CHUNK, None] for a in (u, v, radius))
        px = np.floor(cu) + offsets[None, :, 0]
        py = np.floor(cv) + offsets[None, :, 1]
        # Distance from the point's projection to each candidate pixel's centre.
        inside = ((px + 0.5 - cu) ** 2 + (py + 0.5 - cv) ** 2 <= cr ** 2) | own_pixel
        inside &= (px >= 0) & (px < resolution) & (py >= 0) & (py < resolution)
        rows, _ = np.nonzero(inside)
        pixel_parts.append((py[inside] * resolution + px[inside]).astype(np.int64))
        index_parts.append(rows + start)
    pixel, point_index = np.concatenate(pixel_parts), np.concatenate(index_parts)
    z = depth[point_index]
    zbuffer = np.full(resolution * resolution, np.inf)
    np.minimum.at(zbuffer, pixel, z)
    winners = z <= zbuffer[pixel]
    out_normals[pixel[winners]] = cam_normals[point_index[winners]]
    mask[pixel[winners]] = True
    return out_normals.reshape(resolution, resolution, 3), mask.reshape(resolution, resolution)


def normal_map_image(normals_cam: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """RGBA uint8 [H, W, 4] normal map (view-space colours, transparent background)."""
    view = normals_cam * _CV_TO_VIEW
    rgb = np.round((view + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
    rgb[~mask] = 0
    alpha = np.where(mask, 255, 0).astype(np.uint8)
    return np.concatenate([rgb, alpha[..., None]], axis=-1)


def render_mesh_normal_map(mesh: trimesh.Trimesh, world_to_cam: np.ndarray, intrinsics: np.ndarray,
                           resolution: int) -> np.ndarray:
    return normal_map_image(*mesh_normals(mesh, world_to_cam, intrinsics, resolution))


def render_points_normal_map(points: np.ndarray, normals: np.ndarray, world_to_cam: np.ndarray,
                             intrinsics: np.ndarray, resolution: int, splat_scale: float = 2.0) -> np.ndarray:
    return normal_map_image(*splat_normals(points, normals, world_to_cam, intrinsics, resolution,
                                           splat_scale=splat_scale))


def _on_background(rgba: np.ndarray, resolution: int, background: int) -> np.ndarray:
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(rgba), "RGBA")
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.Resampling.BILINEAR)
    canvas = Image.new("RGBA", image.size, (background, background, background, 255))
    canvas.alpha_composite(image)
    return np.asarray(canvas.convert("RGB"))


def side_by_side(panels: list[tuple[str, np.ndarray]], resolution: int, background: int = 255,
                 caption: str | None = None) -> np.ndarray:
    """Labelled panels (RGBA images, resized to ``resolution``) in one RGB uint8 row."""
    from PIL import Image, ImageDraw

    label_height = 16
    tiles = [_on_background(image, resolution, background) for _, image in panels]
    row = np.concatenate(tiles, axis=1)
    canvas = Image.new("RGB", (row.shape[1], row.shape[0] + label_height * (2 if caption else 1)),
                       (background,) * 3)
    canvas.paste(Image.fromarray(row), (0, label_height))
    draw = ImageDraw.Draw(canvas)
    for i, (label, _) in enumerate(panels):
        draw.text((i * resolution + 4, 2), label, fill=(0, 0, 0))
    if caption:
        draw.text((4, label_height + resolution + 2), caption, fill=(0, 0, 0))
    return np.asarray(canvas)


def comparison_preview(condition_rgba: np.ndarray, generated: trimesh.Trimesh | None,
                       gt_points: np.ndarray, gt_normals: np.ndarray, world_to_cam: np.ndarray,
                       intrinsics: np.ndarray, image_resolution: int, resolution: int = 256,
                       caption: str | None = None) -> np.ndarray:
    """Condition image | generated normal map | ground-truth normal map, from the
    condition image's own camera (``intrinsics`` are for ``image_resolution`` pixels).
    ``generated=None`` (generation failed) leaves the middle panel empty."""
    k = scaled_intrinsics(intrinsics, image_resolution, resolution)
    empty = np.zeros((resolution, resolution, 4), np.uint8)
    gen = empty if generated is None else render_mesh_normal_map(generated, world_to_cam, k, resolution)
    gt = render_points_normal_map(gt_points, gt_normals, world_to_cam, k, resolution)
    return side_by_side([("input", condition_rgba), ("generated", gen), ("ground truth", gt)],
                        resolution, caption=caption)


# ---------------------------------------------------------------------- contact sheets
def orbit(world_to_cam: np.ndarray, degrees: float, up_axis: str = "y") -> np.ndarray:
    """The same camera after the object turned ``degrees`` about the world up axis
    through the origin: a second look at the shape from the side."""
    a = np.radians(degrees)
    c, s = np.cos(a), np.sin(a)
    turn = np.eye(4)
    if up_axis == "y":
        turn[[0, 0, 2, 2], [0, 2, 0, 2]] = [c, s, -s, c]
    elif up_axis == "z":
        turn[[0, 0, 1, 1], [0, 1, 0, 1]] = [c, -s, s, c]
    else:
        raise ValueError(f"up_axis must be 'y' or 'z', got {up_axis!r}")
    return np.asarray(world_to_cam, np.float64) @ turn


def default_camera(resolution: int, up_axis: str = "y", elevation_deg: float = 20.0,
                   fov_deg: float = 40.0) -> tuple[np.ndarray, np.ndarray]:
    """(world_to_cam, intrinsics) framing the normalized cube [-1, 1]^3, for shapes whose
    input image has no stored camera (e.g. user photos in batch generation)."""
    from mar3d.data.render import intrinsics_matrix, look_at

    distance = np.sqrt(3.0) / np.sin(np.radians(fov_deg) / 2.0)
    return look_at(elevation_deg, 0.0, distance, up_axis), intrinsics_matrix(resolution, fov_deg)


def contact_sheet_row(image_rgba: np.ndarray, generated: trimesh.Trimesh | None,
                      gt: tuple[np.ndarray, np.ndarray] | None, world_to_cam: np.ndarray | None,
                      intrinsics: np.ndarray | None, up_axis: str = "y", resolution: int = 160,
                      caption: str | None = None, side_degrees: float = 90.0) -> np.ndarray:
    """One row: input | generated | generated turned ``side_degrees`` | ground truth |
    ground truth turned (the last two only with ``gt`` = (points, normals)).

    The front panels use the input's own camera (``intrinsics`` for the input's pixel size),
    or :func:`default_camera` when the input has none. ``generated=None`` (a failure)
    leaves its panels empty."""
    if world_to_cam is None or intrinsics is None:
        w2c, k = default_camera(resolution, up_axis)
    else:
        w2c = np.asarray(world_to_cam, np.float64)
        k = scaled_intrinsics(intrinsics, image_rgba.shape[1], resolution)
    side = orbit(w2c, side_degrees, up_axis)
    empty = np.zeros((resolution, resolution, 4), np.uint8)
    panels = [("input", image_rgba)]
    for label, cam in (("generated", w2c), (f"generated +{side_degrees:g}deg", side)):
        panels.append((label, empty if generated is None or len(generated.faces) == 0
                       else render_mesh_normal_map(generated, cam, k, resolution)))
    if gt is not None:
        points, normals = gt
        for label, cam in (("ground truth", w2c), (f"ground truth +{side_degrees:g}deg", side)):
            panels.append((label, render_points_normal_map(points, normals, cam, k, resolution)))
    return side_by_side(panels, resolution, caption=caption)


def contact_sheet(rows: list[np.ndarray], title: str | None = None, columns: int = 1) -> np.ndarray:
    """Stack rows made by :func:`contact_sheet_row` into one RGB image, ``columns`` rows
    side by side (narrower rows are padded white), with an optional title line."""
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("a contact sheet needs at least one row")
    columns = max(1, min(columns, len(rows)))
    height = max(r.shape[0] for r in rows)
    width = max(r.shape[1] for r in rows)
    title_height = 20 if title else 0
    per_column = -(-len(rows) // columns)
    canvas = Image.new("RGB", (width * columns, title_height + height * per_column), (255, 255, 255))
    for i, row in enumerate(rows):
        col, line = divmod(i, per_column)
        canvas.paste(Image.fromarray(np.ascontiguousarray(row)), (col * width, title_height + line * height))
    if title:
        ImageDraw.Draw(canvas).text((4, 4), title, fill=(0, 0, 0))
    return np.asarray(canvas)
