"""Per-mesh processing without Ray: loading/validation, watertight, inside tests, sampling,
rendering and the schema round trip."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import trimesh

from _ycb import ycb_mesh
from mar3d.data import DataConfig, MeshError, process_mesh
from mar3d.data.config import small_test_config
from mar3d.data.inside import embree_inside, naive_inside, winding_inside
from mar3d.data.mesh_io import load_mesh
from mar3d.data.render import render_views
from mar3d.data.sampling import sample_occupancy, sharp_edges, surface_pyramid
from mar3d.data.schema import column_to_numpy, rows_to_batch, shard_schema
from mar3d.data.watertight import make_watertight


def test_config_validate_rejects_bad_values():
    DataConfig().validate()
    for bad in [dict(surface_sizes=(1024, 4096)), dict(watertight_epsilon_voxels=0.1),
                dict(near_sigmas=()), dict(render_azimuths_deg=(0.0,)), dict(inside_method="x"),
                dict(max_faces=0), dict(render_up_axis="x"), dict(sharp_edge_fraction=1.5)]:
        with pytest.raises(ValueError):
            DataConfig(**bad).validate()


def test_load_normalizes_into_unit_cube():
    mesh = load_mesh(ycb_mesh("025_mug"), max_faces=10**7, max_file_bytes=10**9)
    lo, hi = mesh.vertices.min(0), mesh.vertices.max(0)
    assert np.isclose(max(np.abs(lo).max(), np.abs(hi).max()), 1.0)
    assert np.allclose(lo + hi, 0.0, atol=1e-9)  # centred bounding box
    raw = trimesh.load(ycb_mesh("025_mug"), process=False)
    mapped = trimesh.transform_points(raw.vertices, mesh.transform)
    assert np.allclose(mapped, mesh.vertices)


@pytest.mark.parametrize("kind, reason", [("too_many", "too_many_faces"), ("large", "file_too_large"),
                                          ("suffix", "unsupported_format"), ("nan", "nonfinite_vertices"),
                                          ("garbage", "unreadable"), ("flat_point", "degenerate")])
def test_load_reports_reason(tmp_path, kind, reason):
    limits = dict(max_faces=10**6, max_file_bytes=10**9)
    box = trimesh.creation.box()
    path = tmp_path / "m.ply"
    if kind == "too_many":
        box.export(path)
        limits["max_faces"] = 4
    elif kind == "large":
        box.export(path)
        limits["max_file_bytes"] = 10
    elif kind == "suffix":
        path = tmp_path / "m.txt"
        path.write_text("hello")
    elif kind == "nan":
        path = tmp_path / "m.obj"
        path.write_text("v 0 0 0\nv 1 0 0\nv nan 1 0\nf 1 2 3\n")
    elif kind == "garbage":
        path = tmp_path / "m.glb"
        path.write_bytes(b"glTF\x02\x00\x00\x00" + b"\xff" * 64)
    elif kind == "flat_point":
        path = tmp_path / "m.obj"
        path.write_text("v 1 1 1\nv 1 1 1\nv 1 1 1\nf 1 2 3\n")
    with pytest.raises(MeshError) as info:
        load_mesh(path, **limits)
    assert info.value.reason_code == reason


def test_watertight_closes_open_mesh_and_labels_match_primitive():
    # An open box (one face removed) becomes a closed shell around it.
    box = trimesh.creation.box(extents=(1.6, 1.6, 1.6))
    open_faces = box.faces[2:]
    result = make_watertight(box.vertices, open_faces, resolution=64, epsilon_voxels=1.0)
    closed = result.mesh
    assert closed.is_watertight and closed.is_winding_consistent and closed.volume > 0

    # Closed primitive: winding-number labels on the watertight icosphere agree with the
    # analytic sphere away from the surface (snapped back onto it by default, one
    # epsilon outside it with the offset method).
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.8)
    wt = make_watertight(sphere.vertices, sphere.faces, resolution=64)
    assert wt.method == "snap"
    rng = np.random.default_rng(0)
    pts = rng.uniform(-1.05, 1.05, (20000, 3))
    radius = 0.8
    dist = np.abs(np.linalg.norm(pts, axis=1) - radius)
    far = dist > 0.02
    truth = np.linalg.norm(pts, axis=1) < radius
    for method in (winding_inside, embree_inside):
        agree = (method(wt.mesh, pts)[far] == truth[far]).mean()
        assert agree >= 0.995, (method.__name__, agree)


def test_inside_methods_agree_on_real_watertight_meshes():
    rng = np.random.default_rng(1)
    for name in ["025_mug", "037_scissors"]:
        mesh = load_mesh(ycb_mesh(name), max_faces=10**7, max_file_bytes=10**9)
        closed = make_watertight(mesh.vertices, mesh.faces, resolution=64).mesh
        pts = np.concatenate([rng.uniform(-1.05, 1.05, (4000, 3)),
                              closed.sample(4000) + rng.normal(scale=0.03, size=(4000, 3))])
        dist = np.abs(trimesh.proximity.signed_distance(closed, pts))
        far = dist > 0.01
        wn, em = winding_inside(closed, pts), embree_inside(closed, pts)
        assert (wn[far] == em[far]).mean() >= 0.995
        sub = np.flatnonzero(far)[:300]  # the pure-Python baseline is slow: a subset
        assert (naive_inside(closed, pts[sub]) == wn[sub]).mean() >= 0.99
        assert 0 < wn.mean() < 1


def test_sharp_edge_sampling_hits_box_edges():
    box = trimesh.creation.box(extents=(1.5, 1.5, 1.5))
    segments, normals = sharp_edges(box.vertices, box.faces, 30.0)
    assert len(segments) == 12  # the 12 cube edges; face diagonals are flat
    wt = make_watertight(box.vertices, box.faces, resolution=64).mesh
    rng = np.random.default_rng(0)
    levels = surface_pyramid(wt, (2000, 500), rng, sharp_fraction=0.5, sharp=(segments, normals))
    assert [len(level) for level in levels] == [2000, 500]
    xyz = levels[0][:, :3]
    # Points on a cube edge have two coordinates at the (offset) extreme.
    near_extreme = (np.abs(xyz) > 0.70).sum(1) >= 2
    assert near_extreme.mean() > 0.45
    assert np.allclose(np.linalg.norm(levels[0][:, 3:], axis=1), 1.0, atol=1e-4)


def test_occupancy_near_points_straddle_surface():
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.7)
    wt = make_watertight(sphere.vertices, sphere.faces, resolution=64).mesh
    occ = sample_occupancy(wt, 3000, 3000, 1.05, (0.005, 0.02), np.random.default_rng(0))
    assert occ["vol_points"].shape == (3000, 3) and occ["near_labels"].dtype == np.uint8
    assert 0.3 < occ["near_labels"].mean() < 0.7
    assert np.abs(occ["vol_points"]).max() <= 1.05


def test_render_textured_mesh_is_fast_and_coloured():
    import time

    mesh = load_mesh(ycb_mesh("077_rubiks_cube"), max_faces=10**7, max_file_bytes=10**9)
    cfg = DataConfig(render_up_axis="z")
    start = time.perf_counter()
    renders = render_views(mesh, cfg.view_angles(), 224, up_axis="z")
    seconds = time.perf_counter() - start
    assert renders.images.shape == (8, 224, 224, 4)
    assert seconds < 3.0, seconds  # 8 x 224^2 rays; ~0.3 s on an idle core
    alpha = renders.images[..., 3]
    assert set(np.unique(alpha)) == {0, 255}
    assert 0.1 < (alpha > 0).mean() < 0.9
    hit = renders.images[..., :3][alpha > 0].astype(int)
    assert len(np.unique(hit // 32, axis=0)) > 8  # texture colours, not a flat grey
    assert (renders.images[..., :3][alpha == 0] == 255).all()  # white background
    # The projection of the mesh centre is the image centre.
    centre = renders.intrinsics[0] @ (renders.world_to_cam[0] @ np.array([0, 0, 0, 1.0]))[:3]
    assert np.allclose(centre[:2] / centre[2], 112.0, atol=1e-3)


def test_process_mesh_row_roundtrips_through_pyarrow():
    cfg = small_test_config(sharp_edge_fraction=0.1)
    row = process_mesh(ycb_mesh("013_apple"), cfg)
    schema = shard_schema(cfg)
    batch = rows_to_batch([row], schema)
    table = pa.Table.from_batches([batch])
    assert table.schema.field("surface_0").type == pa.fixed_shape_tensor(pa.float32(), [2048, 6])
    for name, tp in [("surface_0", (2048, 6)), ("surface_2", (128, 6)), ("images", (2, 64, 64, 4)),
                     ("vol_labels", (2048,)), ("cam_intrinsics", (2, 3, 3))]:
        array = column_to_numpy(table.column(name))
        assert array.shape == (1,) + tp
        assert np.array_equal(array[0], row[name])
    assert row["uid"].startswith(row["source_sha256"][:16])
    assert 0.05 < row["vol_labels"].mean() < 0.9
    bad = dict(row, surface_0=row["surface_0"][:10])
    with pytest.raises(ValueError, match="surface_0"):
        rows_to_batch([bad], schema)


def test_yaml_config_matches_defaults_and_rejects_unknown_keys():
    from mar3d.config import ConfigError, load_config

    path = "data"  # the preset
    assert load_config(DataConfig, path) == DataConfig()
    with pytest.raises(ConfigError):
        load_config(DataConfig, path, ["no_such_key=1"])
    with pytest.raises(ValueError):
        load_config(DataConfig, path, ["surface_sizes=[10, 20]"])


def test_scene_is_flattened_with_node_transforms(tmp_path):
    scene = trimesh.Scene()
    scene.add_geometry(trimesh.creation.box(extents=(1, 1, 1)), node_name="a",
                       transform=trimesh.transformations.translation_matrix([-2, 0, 0]))
    scene.add_geometry(trimesh.creation.icosphere(radius=0.5), node_name="b",
                       transform=trimesh.transformations.translation_matrix([2, 0, 0]))
    path = tmp_path / "scene.glb"
    scene.export(path)
    mesh = load_mesh(path, max_faces=10**6, max_file_bytes=10**9)
    assert len(mesh.parts) == 2
    assert np.allclose(mesh.vertices.min(0)[0], -1.0) and np.allclose(mesh.vertices.max(0)[0], 1.0)
    # Parts sit apart along x after normalization (scale 1/2.5): box centre at -0.8.
    centres = sorted(p.bounds.mean(0)[0] for p in mesh.parts)
    assert np.allclose(centres, [-0.8, 0.8], atol=1e-6)
    renders = render_views(mesh, [(20.0, 0.0)], 48)
    assert renders.images[..., 3].any()
