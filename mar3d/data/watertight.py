"""Watertight conversion: unsigned distance grid -> flood fill -> marching cubes.

As in CraftsMan / Dora / TripoSG (and mesh2sdf), the surface is the ``epsilon`` level set
of the unsigned distance to the input triangles, taken only on the side connected to
the grid border. This closes holes narrower than ~2 epsilon, turns open sheets into thin
closed shells, drops inner (invisible) geometry, and never depends on the input's face
orientation or manifoldness.

The unsigned distance is evaluated exactly only near the surface: the grid is refined
coarse-to-fine in blocks, and a block whose centre is farther than ``band + half its
diagonal`` from the mesh keeps a lower bound (enough to know it is outside the band).
This is ~5x cheaper than querying all R^3 points at R=128.

The epsilon level set is one epsilon (~1 voxel) outside the input everywhere, so its
labels call every point within epsilon outside the object "inside" and shapes come out
a voxel fat. ``method="snap"`` (the default) moves each marching-cubes vertex back onto
its closest point of the input (``snap_to_input``) and keeps the mesh's connectivity, so
the result stays closed and manifold while its geometry follows the original surface.
Where both sides of the level set would land on the same place (open sheets, walls
thinner than epsilon / 10, see ``on_sheet``), snapping would leave zero volume that no
occupancy label or decoder can see, so there the vertices stop ``epsilon / 2`` short:
such parts keep a one-epsilon-thick shell.
"""
from __future__ import annotations

from dataclasses import dataclass

import igl
import numpy as np
import trimesh
from scipy import ndimage
from skimage import measure

from .config import WATERTIGHT_METHODS
from .errors import MeshError


@dataclass
class WatertightResult:
    mesh: trimesh.Trimesh
    epsilon: float  # offset of the epsilon level set from the input, in normalized units
    voxel: float
    exact_queries: int  # how many grid points needed an exact distance query
    method: str = "offset"  # what made ``mesh``: a WATERTIGHT_METHODS entry
    thin_vertices: int = 0  # snap: vertices kept short of a sheet / thin part


@dataclass
class NearestFaces:
    """The input face nearest to each grid point whose distance was computed exactly."""
    flat: np.ndarray  # sorted flat grid indices (i * R^2 + j * R + k)
    face: np.ndarray  # input face index per entry of ``flat``

    def lookup(self, flat: np.ndarray) -> np.ndarray:
        """Face per flat index; -1 where the point was not computed exactly."""
        if len(self.flat) == 0:
            return np.full(len(flat), -1, np.int64)
        pos = np.minimum(np.searchsorted(self.flat, flat), len(self.flat) - 1)
        return np.where(self.flat[pos] == flat, self.face[pos], -1)


def _distance(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """(distance, nearest face) per point."""
    if len(points) == 0:
        return np.zeros(0), np.zeros(0, np.int64)
    d2, face, _ = igl.point_mesh_squared_distance(points, vertices, faces)
    return np.sqrt(np.maximum(d2, 0.0)), face


def narrow_band_udf(vertices: np.ndarray, faces: np.ndarray, axis: np.ndarray, band: float,
                    inner: float = 0.0, coarse_block: int = 16
                    ) -> tuple[np.ndarray, int, NearestFaces]:
    """Unsigned distance on the grid ``axis^3``, exact for values in [inner, band]; elsewhere
    a lower bound (>= band) or an upper bound (< inner), which is all the flood fill and
    marching cubes need there. Returns (grid [R,R,R], number of exact point queries, the
    nearest input face of every exactly computed grid point)."""
    res = len(axis)
    voxel = float(axis[1] - axis[0])
    udf = np.full((res, res, res), np.inf)
    queries = 0
    # Active blocks: (origin index triples) of side `block`; start with the whole grid.
    block = coarse_block
    starts = np.arange(0, res, block)
    origins = np.stack(np.meshgrid(starts, starts, starts, indexing="ij"), -1).reshape(-1, 3)
    while block > 1:
        centers_idx = np.minimum(origins + (block - 1) / 2.0, res - 1)
        centers = axis[0] + centers_idx * voxel
        d = _distance(centers, vertices, faces)[0]
        queries += len(centers)
        half_diag = np.sqrt(3.0) * (block - 1) / 2.0 * voxel
        lower = d - half_diag
        upper = d + half_diag
        far = lower >= band
        deep = upper < inner
        settled = far | deep
        if settled.any():
            # Paint settled blocks at block resolution, then upsample once (vectorized).
            nb = -(-res // block)
            coarse = np.full((nb, nb, nb), np.nan)
            idx = origins[settled] // block
            coarse[idx[:, 0], idx[:, 1], idx[:, 2]] = np.where(far, lower, upper)[settled]
            fine = coarse.repeat(block, 0).repeat(block, 1).repeat(block, 2)[:res, :res, :res]
            mask = ~np.isnan(fine)
            udf[mask] = fine[mask]
        near = origins[~(far | deep)]
        half = block // 2
        offs = np.array([[i, j, k] for i in (0, half) for j in (0, half) for k in (0, half)])
        children = (near[:, None, :] + offs[None]).reshape(-1, 3)
        origins = children[(children < res).all(1)]
        block = half
    d, face = _distance(axis[origins], vertices, faces)
    udf[origins[:, 0], origins[:, 1], origins[:, 2]] = d
    queries += len(origins)
    flat = np.ravel_multi_index(origins.T, (res,) * 3) if len(origins) else np.zeros(0, np.int64)
    order = np.argsort(flat)
    return udf, queries, NearestFaces(flat=flat[order], face=face[order])


def grid_axis(resolution: int, epsilon_voxels: float, extent: float) -> np.ndarray:
    """Coordinates of the distance grid along each axis."""
    # Pad so the offset surface sits >= 3 voxels inside the grid border: the flood fill
    # then starts from a border that is entirely outside.
    pad_voxels = epsilon_voxels + 3.0
    bound = extent * (resolution - 1) / (resolution - 1 - 2 * pad_voxels)
    return np.linspace(-bound, bound, resolution)


def make_watertight(vertices: np.ndarray, faces: np.ndarray, resolution: int = 128,
                    epsilon_voxels: float = 1.0, extent: float = 1.0,
                    method: str = "snap") -> WatertightResult:
    """Closed, consistently oriented mesh around the input (normalized to ``extent``)."""
    if method not in WATERTIGHT_METHODS:
        raise ValueError(f"unknown watertight method {method!r}; choose from {WATERTIGHT_METHODS}")
    vertices = np.ascontiguousarray(vertices, np.float64)
    faces = np.ascontiguousarray(faces, np.int64)
    axis = grid_axis(resolution, epsilon_voxels, extent)
    voxel = float(axis[1] - axis[0])
    eps = epsilon_voxels * voxel
    # The iso-level, a millionth of epsilon inside it: a flat face on a grid plane (every
    # axis-aligned face at a "round" coordinate, the normalized extent included) puts the
    # next grid planes at exactly epsilon, where float rounding scattered the samples to
    # both sides of the level and marching cubes made spurious sheets (a 0.8 x 0.5 x 1
    # box: near-surface label agreement 0.50 at 128^3, a cube 0.71 at 256^3).
    level = eps * (1.0 - 1e-6)
    # Marching cubes interpolates only along grid edges that cross the eps level, whose
    # end points lie within one voxel of it: exact distances are needed only there.
    band = eps + 1.25 * voxel
    inner = eps - 1.25 * voxel
    udf, queries, nearest = narrow_band_udf(vertices, faces, axis, band, inner)
    labels, _ = ndimage.label(udf > level)
    border = np.concatenate([labels[0].ravel(), labels[-1].ravel(), labels[:, 0].ravel(),
                             labels[:, -1].ravel(), labels[:, :, 0].ravel(), labels[:, :, -1].ravel()])
    border = np.unique(border[border > 0])
    if len(border) == 0:
        raise MeshError("watertight_failed", "no grid point outside the epsilon band")
    outside = np.isin(labels, border)
    if outside.all():
        raise MeshError("watertight_failed", "the epsilon band encloses no grid point")
    # Enclosed grid points beyond eps (inner geometry, cavities) must read as inside; every
    # other value stays the distance, since marching cubes interpolates the level's
    # position between a point outside and its neighbour inside the band, and a value
    # changed there moves the surface (a negated one pushed it ~0.6 voxel outward).
    enclosed = ~outside & (udf > level)
    sdf = np.where(enclosed, 0.0, udf)
    try:
        verts, tris, _, _ = measure.marching_cubes(sdf, level=level, spacing=(voxel,) * 3)
    except (ValueError, RuntimeError) as e:
        raise MeshError("watertight_failed", f"marching cubes failed: {e}") from e
    verts = verts + axis[0]
    mesh = _closed_mesh(verts, tris)
    result = WatertightResult(mesh=mesh, epsilon=eps, voxel=voxel, exact_queries=queries)
    if method == "snap":
        candidates = edge_end_faces(mesh.vertices, axis, nearest)
        snapped, away, thin = snap_to_input(mesh.vertices, vertices, faces, eps, voxel, candidates)
        # Snapping moves vertices only: the checked connectivity and orientation carry
        # over. Should the moved geometry enclose no volume, the offset mesh is kept
        # (result.method says which) rather than losing the input.
        moved = trimesh.Trimesh(snapped, mesh.faces, process=False)
        # Normals: the direction from the input to the offset vertex (the distance
        # field's gradient, the input's own normal on its faces) rather than normals of
        # the snapped facets, which fold where many vertices land on one edge.
        unknown = np.linalg.norm(away, axis=1) < 0.5  # vertex on the input already
        if unknown.any():
            away[unknown] = mesh.vertex_normals[unknown]
        moved.vertex_normals = away
        if signed_volume(moved) > 0:
            result.mesh = moved
            result.method, result.thin_vertices = "snap", thin
    return result


def _closed_mesh(verts: np.ndarray, tris: np.ndarray) -> trimesh.Trimesh:
    # process=False: marching cubes vertices are already unique per grid edge; merging
    # coincident ones would glue touching sheets into non-manifold edges.
    mesh = trimesh.Trimesh(verts, tris.astype(np.int64), process=False)
    check_watertight(mesh)
    if signed_volume(mesh) < 0:
        mesh.invert()
    return mesh


def edge_end_faces(points: np.ndarray, axis: np.ndarray, nearest: NearestFaces) -> np.ndarray:
    """[N, 2] nearest input faces of the two grid points at the ends of the grid edge each
    marching-cubes vertex lies on (-1 where unknown)."""
    res, voxel = len(axis), float(axis[1] - axis[0])
    grid = (points - axis[0]) / voxel
    whole = np.round(grid)
    on_node = np.abs(grid - whole) < 1e-4  # the two coordinates the edge does not run along
    ends = []
    for end in (np.floor(grid), np.ceil(grid)):
        index = np.clip(np.where(on_node, whole, end), 0, res - 1).astype(np.int64)
        ends.append(nearest.lookup(np.ravel_multi_index(index.T, (res,) * 3)))
    return np.stack(ends, 1)


def _closest_on_candidates(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray,
                           candidates: np.ndarray) -> np.ndarray:
    """Closest point of each point among its candidate faces (all of them >= 0)."""
    best = np.full(len(points), np.inf)
    closest = np.zeros_like(points)
    for column in candidates.T:
        on_face = trimesh.triangles.closest_point(vertices[faces[column]], points)
        d2 = ((on_face - points) ** 2).sum(1)
        better = d2 < best
        best[better], closest[better] = d2[better], on_face[better]
    return closest


def snap_to_input(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray, epsilon: float,
                  voxel: float, candidates: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray, int]:
    """``points`` of the epsilon level set moved back onto the input surface: (moved
    points, unit directions from the input towards each point (0 where it lies on the
    input already), how many stopped ``epsilon / 2`` short on a sheet).

    ``candidates`` ([N, k] face indices, -1 = unknown) restricts the closest-point search
    to a few faces per point: for a marching-cubes vertex the nearest faces of its grid
    edge's two ends (``edge_end_faces``), which the distance grid has computed already.
    The nearest point of a vertex lies on one of them unless the nearest face changes
    within that voxel edge; the point found is on the input either way. Points with an
    unknown candidate get an exact search over all faces."""
    closest = np.empty_like(points)
    known = np.zeros(len(points), bool) if candidates is None else (candidates >= 0).all(1)
    if known.any():
        closest[known] = _closest_on_candidates(points[known], vertices, faces, candidates[known])
    if (~known).any():
        closest[~known] = igl.point_mesh_squared_distance(points[~known], vertices, faces)[2]
    distance = np.linalg.norm(points - closest, axis=1, keepdims=True)
    away = np.divide(points - closest, distance, out=np.zeros_like(points), where=distance > 1e-12)
    sheet = on_sheet(closest, away, epsilon, voxel)
    short = closest + away * np.minimum(distance, 0.5 * epsilon)
    return np.where(sheet[:, None], short, closest), away, int(sheet.sum())


def on_sheet(closest: np.ndarray, away: np.ndarray, epsilon: float, voxel: float) -> np.ndarray:
    """Boolean [N]: the point's snapped position lies on a sheet, i.e. the level set's
    other side snaps onto the same place: another point within a voxel of it, facing the
    opposite way, less than epsilon / 10 away along its normal. On a solid the other side
    is the solid's thickness away, so walls down to epsilon / 10 (a plate scanned at a
    third of a voxel) keep their true thickness, while open sheets, the rims of sheets and
    knife edges keep a thin shell. Purely geometric: holes or flipped faces in the input
    do not change the answer (a winding-number probe of the input did, and cost 4x more)."""
    from scipy.spatial import cKDTree

    pairs = cKDTree(closest).query_pairs(r=voxel, output_type="ndarray")
    i, j = pairs[:, 0], pairs[:, 1]
    facing = (away[i] * away[j]).sum(1) < -0.5
    gap = np.abs(((closest[j] - closest[i]) * away[i]).sum(1))
    both = facing & (gap < 0.1 * epsilon)
    sheet = np.zeros(len(closest), bool)
    sheet[i[both]] = True
    sheet[j[both]] = True
    return sheet


def signed_volume(mesh: trimesh.Trimesh) -> float:
    """Enclosed volume of a closed mesh (divergence theorem), without trimesh's full
    mass properties (inertia included), which cost ~10x more."""
    tri = mesh.vertices[mesh.faces]
    return float(np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6.0)


def check_watertight(mesh: trimesh.Trimesh) -> None:
    """Every edge shared by exactly two faces, consistent winding, positive volume."""
    if len(mesh.faces) == 0:
        raise MeshError("watertight_failed", "marching cubes produced no triangles")
    if not mesh.is_watertight:
        raise MeshError("watertight_failed", "result has boundary or non-manifold edges")
    if not mesh.is_winding_consistent:
        raise MeshError("watertight_failed", "result has inconsistent face winding")
    if not abs(signed_volume(mesh)) > 0:
        raise MeshError("watertight_failed", "result encloses zero volume")


# Parts checked pairwise for contact (one distance query per part): assemblies with more
# parts than this go through the grid instead.
CLOSED_INPUT_MAX_PARTS = 64


def closed_input(vertices: np.ndarray, faces: np.ndarray) -> trimesh.Trimesh | None:
    """The input itself when it already bounds a solid exactly, else None.

    Such a mesh (CAD output, procedural solids, many cleaned scans) needs no distance
    grid: its own surface gives exact samples and labels, and the grid would only cost
    time and round its edges. It qualifies when, with corners at equal positions merged
    (exporters split vertices along UV seams and hard edges), every edge joins exactly
    two faces with consistent winding, it encloses volume, and no two of its faces cross:
    overlapping closed parts (an assembly of separate solids) would make ray parity call
    their overlap outside, and so would a solid nested inside another with the same
    orientation. Crossing is tested exactly enough for that purpose: two triangles that
    intersect have an edge of one passing through the other, so every edge is cast as a
    ray (Embree) against the faces that do not touch it. Nesting: just inside each
    connected part the winding number of the whole mesh must be 1 (a cavity, a part
    nested with opposite orientation, is fine). Parts that touch (a leg standing on a
    table top as two shells: coincident faces inside the object, which parity counts as
    two walls) are refused too, and so are assemblies of more than
    ``CLOSED_INPUT_MAX_PARTS`` parts.
    """
    # process=True merges equal positions; validate=True would also re-orient every part
    # outwards (a cavity's inner wall included), so degenerate faces are dropped by hand.
    mesh = trimesh.Trimesh(np.asarray(vertices, np.float64), np.asarray(faces, np.int64), process=True)
    mesh.update_faces(mesh.nondegenerate_faces())
    if len(mesh.faces) < 4 or not mesh.is_watertight or not mesh.is_winding_consistent:
        return None
    volume = signed_volume(mesh)
    if not abs(volume) > 1e-9:
        return None
    if volume < 0:
        mesh.invert()
    part = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(mesh.faces))
    if part.max() + 1 > CLOSED_INPUT_MAX_PARTS:
        return None
    if faces_cross(mesh) or nested_parts(mesh, part) or touching_parts(mesh, part):
        return None
    return mesh


def nested_parts(mesh: trimesh.Trimesh, part: np.ndarray) -> bool:
    """Whether some connected part (``part``: label per face) lies inside another with the
    same orientation (the winding number just inside its largest face is not 1)."""
    if part.max() == 0:
        return False
    area = mesh.area_faces
    probes = []
    for k in range(part.max() + 1):
        members = np.flatnonzero(part == k)
        face = members[area[members].argmax()]
        step = 1e-4 * np.sqrt(area[face])
        probes.append(mesh.triangles_center[face] - mesh.face_normals[face] * step)
    winding = igl.fast_winding_number(np.ascontiguousarray(mesh.vertices), np.ascontiguousarray(mesh.faces),
                                      np.asarray(probes, np.float64))
    return bool((np.abs(winding - 1.0) > 0.25).any())


def faces_cross(mesh: trimesh.Trimesh) -> bool:
    """Whether any edge of ``mesh`` passes through a face that shares no vertex with it."""
    from trimesh.ray.ray_pyembree import RayMeshIntersector

    edges = mesh.edges_unique
    start, end = mesh.vertices[edges[:, 0]], mesh.vertices[edges[:, 1]]
    length = np.linalg.norm(end - start, axis=1)
    hit_face, hit_ray, where = RayMeshIntersector(mesh).intersects_id(
        start, (end - start) / length[:, None], multiple_hits=True, return_locations=True)
    if len(hit_face) == 0:
        return False
    t = np.einsum("ij,ij->i", where - start[hit_ray], (end - start)[hit_ray]) / length[hit_ray]
    # Faces touching either end vertex meet the edge there by construction.
    touching = (mesh.faces[hit_face][:, :, None] == edges[hit_ray][:, None, :]).any((1, 2))
    strictly_inside = (t > 1e-7 * length[hit_ray]) & (t < length[hit_ray] * (1 - 1e-7))
    return bool((strictly_inside & ~touching).any())


def touching_parts(mesh: trimesh.Trimesh, part: np.ndarray) -> bool:
    """Whether a vertex of one connected part (``part``: label per face) lies on another
    part's surface."""
    if part.max() == 0:
        return False
    tolerance = 1e-7 * float(mesh.scale)
    for k in range(part.max() + 1):
        own = part == k
        corners = mesh.vertices[np.unique(mesh.faces[own])]
        d2, _, _ = igl.point_mesh_squared_distance(corners, np.ascontiguousarray(mesh.vertices),
                                                   np.ascontiguousarray(mesh.faces[~own]))
        if (d2 < tolerance ** 2).any():
            return True
    return False
