"""Reconstruction metrics on meshes with known answers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import trimesh

from _ycb import ycb_mesh
from mar3d.metrics import (chamfer_distance, f_score, mesh_metrics, normal_consistency,
                           normalization_transform, sample_surface, volume_iou)


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
