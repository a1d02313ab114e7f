"""Mesh extraction: dense vs hierarchical decoding on analytic fields and a real YCB mesh."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh

from _ycb import ycb_mesh
from mar3d.geometry import extract_mesh, keep_large_components, save_mesh
from mar3d.geometry.analytic import (box_sdf, sdf_occupancy_fn, sphere_sdf, torus_sdf,
                                     winding_number_occupancy_fn)
from mar3d.geometry.extract import _default_coarse_resolution, _upsample2, grid_coordinates

SHAPES = {
    "sphere": (sphere_sdf(0.8), 4 / 3 * math.pi * 0.8 ** 3),
    "torus": (torus_sdf(0.6, 0.2), 2 * math.pi ** 2 * 0.6 * 0.2 ** 2),
    "thin_plate": (box_sdf((0.8, 0.8, 0.04)), 1.6 * 1.6 * 0.08),
}


def test_upsample2_is_trilinear():
    # Trilinear interpolation keeps the coarse points and reproduces a product of
    # per-axis linear functions exactly at the new midpoints.
    i, j, k = np.meshgrid(np.arange(5.0), np.arange(4.0), np.arange(3.0), indexing="ij")
    coarse = ((1 + 2 * i) * (3 - j) * (0.5 + k)).astype(np.float32)
    fi, fj, fk = np.meshgrid(np.arange(9) / 2, np.arange(7) / 2, np.arange(5) / 2, indexing="ij")
    fine = _upsample2(coarse)
    assert fine.shape == (9, 7, 5) and fine.dtype == np.float32 and fine.flags.c_contiguous
    np.testing.assert_allclose(fine, (1 + 2 * fi) * (3 - fj) * (0.5 + fk), rtol=1e-6)
    assert np.array_equal(fine[::2, ::2, ::2], coarse)


def grid_iou(a: np.ndarray, b: np.ndarray, level: float = 0.0) -> float:
    a, b = a > level, b > level
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_hierarchical_matches_dense_with_far_fewer_queries(name):
    sdf, volume = SHAPES[name]
    fn = sdf_occupancy_fn(sdf)
    dense = extract_mesh(fn, resolution=128, method="dense", return_grid=True)
    fast = extract_mesh(fn, resolution=128, method="hierarchical", return_grid=True)
    assert dense.num_queries == 129 ** 3
    assert grid_iou(dense.grid, fast.grid) >= 0.99
    assert fast.num_queries < 0.3 * dense.num_queries
    for result in (dense, fast):
        assert result.mesh.is_watertight
        assert math.isclose(result.mesh.volume, volume, rel_tol=0.05)  # > 0: outward normals


def test_feature_between_coarse_points_needs_a_band():
    """A plate thinner than the coarse spacing lying between coarse grid points has no
    coarse sign change; ``band`` (logits near the iso-level) recovers it."""
    fn = sdf_occupancy_fn(lambda p: box_sdf((0.8, 0.8, 0.01))(p - np.array([0.0, 0.0, 0.033])))
    dense = extract_mesh(fn, resolution=128, method="dense", return_grid=True)
    blind = extract_mesh(fn, resolution=128, coarse_resolution=32, return_grid=True)
    banded = extract_mesh(fn, resolution=128, coarse_resolution=32, band=3.0, return_grid=True)
    assert len(dense.mesh.faces) > 0
    assert len(blind.mesh.faces) == 0
    assert grid_iou(dense.grid, banded.grid) >= 0.99
    assert banded.num_queries < 0.3 * dense.num_queries


def straddling_points(grid: np.ndarray, level: float = 0.0) -> np.ndarray:
    """Mask of the grid points that are corners of a cell whose corners straddle ``level``."""
    inside = grid > level
    r = [s - 1 for s in grid.shape]
    views = [(di, dj, dk) for di in (0, 1) for dj in (0, 1) for dk in (0, 1)]
    corner = [inside[di:di + r[0], dj:dj + r[1], dk:dk + r[2]] for di, dj, dk in views]
    cells = np.logical_or.reduce(corner) & ~np.logical_and.reduce(corner)
    points = np.zeros(grid.shape, bool)
    for di, dj, dk in views:
        points[di:di + r[0], dj:dj + r[1], dk:dk + r[2]] |= cells
    return points


def fin_field(half_length: float = 0.9):
    """A ball with a fin 0.02 thick (a third of the coarse spacing at 128 / 32) that lies
    between coarse grid points along z and reaches out to x = +-``half_length``."""
    ball, fin = sphere_sdf(0.4), box_sdf((half_length, 0.3, 0.01))
    return sdf_occupancy_fn(lambda p: np.minimum(ball(p), fin(p - np.array([0.0, 0.0, 0.033]))))


@pytest.mark.parametrize("name", ["torus", "fin"])
@pytest.mark.parametrize("dilate", [0, 1])
def test_every_surface_cell_is_decoded_exactly(name, dilate):
    """The hierarchical grid equals the dense one bit for bit at every corner of every
    cell where the sign changes, so marching cubes builds the same faces there."""
    fn = fin_field() if name == "fin" else sdf_occupancy_fn(SHAPES[name][0])
    dense = extract_mesh(fn, resolution=128, method="dense", return_grid=True)
    fast = extract_mesh(fn, resolution=128, coarse_resolution=32, dilate=dilate, return_grid=True)
    surface = straddling_points(fast.grid)
    assert surface.sum() > 10_000
    assert np.array_equal(fast.grid[surface], dense.grid[surface])
    assert np.array_equal(straddling_points(dense.grid), surface)
    assert grid_iou(dense.grid, fast.grid) >= 0.999
    assert fast.num_queries < (0.12 if dilate == 0 else 0.25) * dense.num_queries


def test_surface_is_followed_along_a_fin_the_coarse_grid_misses():
    """The coarse grid sees the fin only where it leaves the ball (the fin lies between
    coarse points); following the sign changes at the finer levels recovers all of it."""
    dense = extract_mesh(fin_field(), resolution=128, method="dense")
    fast = extract_mesh(fin_field(), resolution=128, coarse_resolution=32, dilate=0)
    ball_only = extract_mesh(sdf_occupancy_fn(sphere_sdf(0.4)), resolution=128, method="dense")
    assert fast.mesh.bounds[1, 0] > 0.88 and fast.mesh.bounds[0, 0] < -0.88  # the fin's tips
    assert len(fast.mesh.faces) == len(dense.mesh.faces) > 1.3 * len(ball_only.mesh.faces)


def test_real_mesh_winding_number_field(ycb_root):
    mesh = trimesh.load(ycb_mesh("025_mug"), force="mesh", process=False)
    lo, hi = mesh.bounds
    mesh.apply_translation(-(lo + hi) / 2)
    mesh.apply_scale(1.8 / (hi - lo).max())
    fn = winding_number_occupancy_fn(mesh.vertices, mesh.faces)
    dense = extract_mesh(fn, resolution=64, method="dense", return_grid=True)
    fast = extract_mesh(fn, resolution=64, method="hierarchical", return_grid=True)
    assert grid_iou(dense.grid, fast.grid) >= 0.99
    assert fast.num_queries < 0.5 * dense.num_queries
    assert len(fast.mesh.faces) > 1000


def test_default_coarse_grid_stops_growing_above_128():
    # resolution / 4 up to 128; above, at least 32 cells and at most 8 fine cells per
    # coarse cell (the surface is followed, so the coarse grid only has to find it)
    assert {r: _default_coarse_resolution(r) for r in (32, 96, 128, 192, 256, 384, 512)} == \
        {32: 8, 96: 24, 128: 32, 192: 48, 256: 32, 384: 48, 512: 64}


def test_batches_torch_outputs_and_query_counting():
    calls = []

    def fn(points: np.ndarray):
        calls.append(len(points))
        assert points.dtype == np.float32 and points.shape[1] == 3
        return torch.from_numpy(sdf_occupancy_fn(sphere_sdf(0.5))(points))  # tensors are accepted

    result = extract_mesh(fn, resolution=32, batch_size=1000, method="dense")
    assert max(calls) == 1000 and sum(calls) == 33 ** 3 == result.num_queries
    assert result.query_fraction == 1.0 and result.decode_seconds <= result.seconds
    assert result.grid is None


def test_grid_coordinates_span_the_bounds():
    n = 17
    corners = grid_coordinates(np.array([0, n ** 3 - 1, (n // 2) * (n * n + n + 1)]), 16, 1.05)
    np.testing.assert_allclose(corners, [[-1.05] * 3, [1.05] * 3, [0.0] * 3], atol=1e-6)


def test_empty_and_full_fields_give_empty_meshes():
    for value in (-1.0, 1.0):
        result = extract_mesh(lambda p, v=value: np.full(len(p), v, np.float32), resolution=32)
        assert len(result.mesh.faces) == 0
        assert result.num_queries == 9 ** 3  # nothing to refine beyond the coarse grid


def test_small_floating_components_are_removed():
    big, small = sphere_sdf(0.6, (-0.2, 0, 0)), sphere_sdf(0.08, (0.8, 0.8, 0.8))
    fn = sdf_occupancy_fn(lambda p: np.minimum(big(p), small(p)))
    kept = extract_mesh(fn, resolution=64)
    assert len(kept.mesh.split(only_watertight=False)) == 2
    cleaned = extract_mesh(fn, resolution=64, remove_small_components=0.05)
    parts = cleaned.mesh.split(only_watertight=False)
    assert len(parts) == 1 and parts[0].bounds[1, 0] < 0.5
    assert len(keep_large_components(kept.mesh, 0.0).faces) == len(kept.mesh.faces)


@pytest.mark.parametrize("suffix", [".glb", ".obj", ".ply"])
def test_save_mesh_round_trips(tmp_path, suffix):
    mesh = extract_mesh(sdf_occupancy_fn(sphere_sdf(0.7)), resolution=32).mesh
    path = save_mesh(mesh, tmp_path / "out" / f"sphere{suffix}")
    loaded = trimesh.load(path, force="mesh")
    assert len(loaded.faces) == len(mesh.faces)
    np.testing.assert_allclose(loaded.bounds, mesh.bounds, atol=1e-5)


def test_bad_arguments_are_rejected(tmp_path):
    fn = sdf_occupancy_fn(sphere_sdf())
    with pytest.raises(ValueError, match="unsupported mesh format"):
        save_mesh(trimesh.creation.box(), tmp_path / "x.stl")
    with pytest.raises(ValueError, match="method"):
        extract_mesh(fn, resolution=32, method="octree")
    with pytest.raises(ValueError, match="power of two"):
        extract_mesh(fn, resolution=96, coarse_resolution=40)
    with pytest.raises(ValueError, match="returned"):
        extract_mesh(lambda p: np.zeros(3), resolution=8, method="dense")
