"""Reconstruction metrics on meshes with known answers."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import trimesh

from _ycb import ycb_mesh
from mar3d.metrics import (chamfer_distance, edge_metrics, f_score, mesh_metrics,
                           normal_consistency, normalization_transform, sample_surface,
                           segment_distance, volume_iou)


@pytest.fixture(scope="module")
def spheres():
    return trimesh.creation.icosphere(5, radius=0.5), trimesh.creation.icosphere(5, radius=0.6)


def test_identical_meshes_are_perfect(spheres):
    small, _ = spheres
    m = mesh_metrics(small, small, num_points=5000, with_volume_iou=True)
    assert m["chamfer"] == 0.0
    assert m["f_score"] == m["precision"] == m["recall"] == 1.0
    assert m["normal_consistency"] == pytest.approx(1.0)
    assert m["volume_iou"] == 1.0


def test_concentric_spheres_chamfer_is_radius_difference(spheres):
    small, large = spheres
    raw = mesh_metrics(large, small, num_points=20000, normalize=False, with_volume_iou=True)
    assert raw["chamfer"] == pytest.approx(0.1, abs=2e-3)
    assert raw["normal_consistency"] == pytest.approx(1.0, abs=1e-3)
    assert raw["f_score"] == 0.0                       # 0.1 apart, tau = 0.05
    assert mesh_metrics(large, small, num_points=20000, normalize=False, threshold=0.11)["f_score"] == 1.0
    assert raw["volume_iou"] == pytest.approx((0.5 / 0.6) ** 3, abs=0.01)
    assert volume_iou(small, large) == raw["volume_iou"] == volume_iou(large, small)  # same points
    # normalized by the GT box: radius 0.5 -> 1, so the gap doubles
    normalized = mesh_metrics(large, small, num_points=20000)
    assert normalized["chamfer"] == pytest.approx(0.2, abs=4e-3)


def test_normalization_uses_the_ground_truth_box_only():
    t = normalization_transform(np.array([[0.0, 1.0, 2.0], [4.0, 2.0, 3.0]]))
    corners = np.array([[0.0, 1.0, 2.0, 1.0], [4.0, 2.0, 3.0, 1.0]]) @ t.T
    np.testing.assert_allclose(corners[:, :3], [[-1, -0.25, -0.25], [1, 0.25, 0.25]])
    # scaling both meshes together changes nothing once normalized
    box, shifted = trimesh.creation.box((1, 1, 1)), trimesh.creation.box((1, 1, 1))
    shifted.apply_translation((0.05, 0, 0))
    a = mesh_metrics(shifted, box, num_points=5000)
    box.apply_scale(10)
    shifted.apply_scale(10)
    b = mesh_metrics(shifted, box, num_points=5000)
    assert a["chamfer"] == pytest.approx(b["chamfer"], rel=1e-6)
    with pytest.raises(ValueError, match="degenerate"):
        normalization_transform(np.zeros((2, 3)))


def test_flipped_normals_do_not_hurt_and_perpendicular_ones_do():
    rng = np.random.default_rng(0)
    points = rng.uniform(-1, 1, (2000, 3))
    up = np.tile([0.0, 0.0, 1.0], (2000, 1))
    assert normal_consistency(points, up, points, -up) == pytest.approx(1.0)
    assert normal_consistency(points, up, points, np.tile([1.0, 0.0, 0.0], (2000, 1))) == pytest.approx(0.0)


def test_point_functions_and_partial_overlap():
    gt = np.array([[0.0, 0, 0], [1.0, 0, 0]])
    pred = np.array([[0.0, 0, 0], [0.0, 3.0, 0]])
    assert chamfer_distance(pred, gt) == pytest.approx(0.5 * (3.0 / 2 + 1.0 / 2))
    f, precision, recall = f_score(pred, gt, threshold=0.5)
    assert (precision, recall) == (0.5, 0.5) and f == 0.5
    with pytest.raises(ValueError, match="threshold"):
        f_score(pred, gt, threshold=0.0)


def test_ground_truth_as_points_and_empty_prediction(spheres):
    small, large = spheres
    points, normals = sample_surface(small, 8000, seed=3)
    m = mesh_metrics(large, (points, normals), num_points=8000, normalize=False)
    assert m["chamfer"] == pytest.approx(0.1, abs=3e-3)
    empty = trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64))
    failed = mesh_metrics(empty, small, num_points=1000, with_volume_iou=True)
    assert failed["f_score"] == 0.0 and math.isinf(failed["chamfer"]) and failed["volume_iou"] == 0.0
    with pytest.raises(ValueError, match="needs a ground-truth mesh"):
        mesh_metrics(large, (points, normals), with_volume_iou=True)


def test_real_scan_against_a_perturbed_copy(ycb_root):
    """A real, non-watertight YCB mesh: metrics degrade monotonically with the offset."""
    gt = trimesh.load(ycb_mesh("013_apple"), force="mesh", process=False)
    scores = []
    for offset in (0.0, 0.01, 0.05):
        pred = gt.copy()
        pred.apply_translation((offset * gt.extents.max(), 0, 0))
        scores.append(mesh_metrics(pred, gt, num_points=10000, with_volume_iou=True))
    assert scores[0]["chamfer"] == 0.0 and scores[0]["volume_iou"] > 0.99
    assert scores[0]["chamfer"] < scores[1]["chamfer"] < scores[2]["chamfer"]
    assert scores[0]["f_score"] >= scores[1]["f_score"] > scores[2]["f_score"]
    assert scores[1]["volume_iou"] > scores[2]["volume_iou"]


def cube_edges(half: float = 0.5) -> np.ndarray:
    corners = np.array(list(itertools.product((-half, half), repeat=3)))
    pairs = [(i, j) for i in range(8) for j in range(i + 1, 8) if (corners[i] != corners[j]).sum() == 1]
    return corners[np.array(pairs)]


def test_segment_distance_is_exact_up_to_the_limit():
    edges = cube_edges()
    assert len(edges) == 12
    points = np.array([[0.5, 0.5, 0.5], [0.55, 0.3, 0.5], [0.45, 0.2, 0.45], [0.6, 0.6, 0.0],
                       [0.0, 0.0, 0.0], [0.0, 0.5, 0.51]])
    d = segment_distance(points, edges, 0.2)
    np.testing.assert_allclose(d[[0, 1, 2, 3, 5]], [0.0, 0.05, 0.05 * math.sqrt(2), 0.1 * math.sqrt(2), 0.01],
                               atol=1e-12)
    assert math.isinf(d[4])  # the centre is 0.71 from every edge
    # the middle of a length-1 edge is found although the limit is far below its length
    assert segment_distance(points[5:], edges, 0.02)[0] == pytest.approx(0.01)
    assert np.isinf(segment_distance(points, np.zeros((0, 2, 3)), 0.1)).all()


def test_edge_metrics_on_a_cube():
    box, edges, d = trimesh.creation.box((1, 1, 1)), cube_edges(), 0.1
    points, normals = sample_surface(box, 100_000, seed=0)
    # The band covers each unit face but its inner (1 - 2d)^2 square.
    assert np.isfinite(segment_distance(points, edges, d)).mean() == pytest.approx(4 * d - 4 * d * d, abs=0.01)
    same = edge_metrics(points, normals, points, normals, edges, d)
    assert same["edge_chamfer"] == 0.0 and same["edge_nc"] == pytest.approx(1.0)
    # A 1.2x cube: each GT band point is 0.1 from the parallel face; the big cube's points
    # mapped into the band are >= 0.1 away (more around the corners, up to 0.1 * sqrt 2).
    big = box.copy()
    big.apply_scale(1.2)
    m = edge_metrics(*sample_surface(big, 100_000, seed=1), points, normals, edges, d)
    assert m["edge_completeness"] == pytest.approx(0.1, abs=0.003)
    assert 0.1 < m["edge_accuracy"] < 0.1 * math.sqrt(2)
    assert m["edge_chamfer"] == pytest.approx(0.5 * (m["edge_completeness"] + m["edge_accuracy"]))
    # A small sphere inside: no point of it maps into the band, so accuracy is undefined.
    inner = edge_metrics(*sample_surface(trimesh.creation.icosphere(3, radius=0.3), 20_000),
                         points, normals, edges, d)
    assert inner["edge_pred_points"] == 0 and math.isnan(inner["edge_chamfer"])
    assert inner["edge_completeness"] > 0.2
    empty = edge_metrics(np.zeros((0, 3)), np.zeros((0, 3)), points, normals, edges, d)
    assert empty["edge_gt_points"] == m["edge_gt_points"] and math.isnan(empty["edge_completeness"])
