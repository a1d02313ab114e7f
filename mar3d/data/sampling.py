"""Surface point pyramids (optionally sharp-edge weighted) and occupancy samples."""
from __future__ import annotations

import igl
import numpy as np
import trimesh

from .inside import inside


def sample_surface(mesh: trimesh.Trimesh, count: int, rng: np.random.Generator) -> np.ndarray:
    """Area-weighted points with unit normals, float32 [count, 6].

    Normals interpolate the vertex normals: marching-cubes faces are small facets whose
    own normals alias the grid, while the interpolated ones follow the smooth surface.
    """
    if count == 0:
        return np.zeros((0, 6), np.float32)
    areas = mesh.area_faces
    cdf = np.cumsum(areas)
    face = np.searchsorted(cdf, rng.random(count) * cdf[-1], side="right")
    face = np.minimum(face, len(areas) - 1)
    u, v = rng.random(count), rng.random(count)
    flip = u + v > 1.0
    u[flip], v[flip] = 1.0 - u[flip], 1.0 - v[flip]
    bary = np.stack([1.0 - u - v, u, v], 1)
    tri = mesh.faces[face]
    points = np.einsum("nk,nkd->nd", bary, mesh.vertices[tri])
    normals = np.einsum("nk,nkd->nd", bary, mesh.vertex_normals[tri])
    normals = _unit(normals, fallback=mesh.face_normals[face])
    return np.concatenate([points, normals], 1).astype(np.float32)


def _unit(vectors: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(vectors, axis=1, keepdims=True)
    bad = norm[:, 0] < 1e-12
    out = vectors / np.maximum(norm, 1e-12)
    out[bad] = fallback[bad]
    return out


def sharp_edges(vertices: np.ndarray, faces: np.ndarray, angle_deg: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """Edges whose dihedral angle exceeds ``angle_deg``: (segments [E,2,3], normals [E,3]),
    the normal being the average of the two adjacent face normals."""
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    # Merge by position so UV seams do not hide adjacency.
    mesh.merge_vertices(merge_tex=True, merge_norm=True)
    if len(mesh.face_adjacency) == 0:
        return np.zeros((0, 2, 3)), np.zeros((0, 3))
    sharp = mesh.face_adjacency_angles > np.radians(angle_deg)
    edges = mesh.face_adjacency_edges[sharp]
    pair = mesh.face_adjacency[sharp]
    normals = mesh.face_normals[pair[:, 0]] + mesh.face_normals[pair[:, 1]]
    normals = _unit(normals, fallback=mesh.face_normals[pair[:, 0]])
    return mesh.vertices[edges], normals


def sample_sharp(segments: np.ndarray, normals: np.ndarray, count: int,
                 rng: np.random.Generator, project_to: trimesh.Trimesh | None = None) -> np.ndarray:
    """``count`` points along sharp edges (length-weighted), float32 [count, 6]; with
    ``project_to`` they are snapped onto that (watertight) surface."""
    lengths = np.linalg.norm(segments[:, 1] - segments[:, 0], axis=1)
    cdf = np.cumsum(lengths)
    edge = np.minimum(np.searchsorted(cdf, rng.random(count) * cdf[-1], side="right"), len(lengths) - 1)
    t = rng.random(count)[:, None]
    points = segments[edge, 0] * (1.0 - t) + segments[edge, 1] * t
    if project_to is not None:
        points = igl.point_mesh_squared_distance(
            points, np.ascontiguousarray(project_to.vertices, np.float64),
            np.ascontiguousarray(project_to.faces, np.int64))[2]
    return np.concatenate([points, normals[edge]], 1).astype(np.float32)


def surface_pyramid(mesh: trimesh.Trimesh, sizes: tuple[int, ...], rng: np.random.Generator,
                    sharp_fraction: float = 0.0,
                    sharp: tuple[np.ndarray, np.ndarray] | None = None,
                    project_sharp_to: trimesh.Trimesh | None = None) -> list[np.ndarray]:
    """One independent sample per level (level 0 finest). With sharp-edge sampling a
    ``sharp_fraction`` of every level lies on sharp edges (none if the mesh has none),
    snapped onto ``project_sharp_to`` when given."""
    levels = []
    for n in sizes:
        n_sharp = int(round(n * sharp_fraction)) if sharp is not None and len(sharp[0]) else 0
        parts = [sample_surface(mesh, n - n_sharp, rng)]
        if n_sharp:
            parts.append(sample_sharp(sharp[0], sharp[1], n_sharp, rng, project_to=project_sharp_to))
        pts = np.concatenate(parts)
        levels.append(pts[rng.permutation(len(pts))])
    return levels


def sample_occupancy(mesh: trimesh.Trimesh, num_vol: int, num_near: int, bound: float,
                     sigmas: tuple[float, ...], rng: np.random.Generator, method: str = "embree"
                     ) -> dict[str, np.ndarray]:
    """Uniform points in [-bound, bound]^3 and near-surface points (surface + Gaussian noise,
    split evenly over ``sigmas``), each labelled 1 = inside the watertight ``mesh``."""
    vol = rng.uniform(-bound, bound, (num_vol, 3))
    counts = np.full(len(sigmas), num_near // len(sigmas))
    counts[: num_near % len(sigmas)] += 1
    base = sample_surface(mesh, num_near, rng)[:, :3].astype(np.float64)
    scale = np.repeat(np.asarray(sigmas, np.float64), counts)[:, None]
    near = base + rng.normal(size=base.shape) * scale
    labels = inside(mesh, np.concatenate([vol, near]), method).astype(np.uint8)
    return {"vol_points": vol.astype(np.float32), "vol_labels": labels[:num_vol],
            "near_points": near.astype(np.float32), "near_labels": labels[num_vol:]}
