"""The Ray Data job end to end: good and broken inputs in one run, shard schema with plain
pyarrow, manifest hashes, idempotent re-runs, partial shards, manifest inputs, readers."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import trimesh

from mar3d.data import ShapeDataset, prepare_dataset, ray_dataset
from mar3d.data.config import small_test_config
from mar3d.data.prepare import discover_inputs

pytestmark = pytest.mark.e2e

EXPECTED_ERRORS = {
    "truncated.glb": {"unreadable", "empty"},
    "vertices_only.obj": {"empty"},
    "nan_vertices.obj": {"nonfinite_vertices"},
    "not_a_mesh.stl": {"unreadable", "empty"},
    "zero_faces.ply": {"empty"},
    "huge.ply": {"too_many_faces"},
    "empty_file.obj": {"empty"},
}


def _make_inputs(root: Path, ycb_root: Path) -> None:
    for name in ["013_apple", "037_scissors"]:
        os.symlink(ycb_root / name, root / name)
    good = root / "primitives"
    good.mkdir()
    trimesh.creation.box(extents=(1.0, 0.6, 0.4)).export(good / "box.glb")
    bad = root / "bad"
    bad.mkdir()
    data = trimesh.creation.icosphere(subdivisions=3).export(file_type="glb")
    (bad / "truncated.glb").write_bytes(data[: len(data) // 3])
    (bad / "vertices_only.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\n")
    (bad / "nan_vertices.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 nan 1\nf 1 2 3\n")
    (bad / "not_a_mesh.stl").write_bytes(b"this is a text file, not an STL at all\n" * 3)
    trimesh.PointCloud(np.random.default_rng(0).random((10, 3))).export(bad / "zero_faces.ply")
    trimesh.creation.icosphere(subdivisions=6).export(bad / "huge.ply")  # 81920 faces
    (bad / "empty_file.obj").write_bytes(b"")
    (bad / "README.txt").write_text("not a mesh suffix: ignored by directory discovery")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ycb_root, ray_local):
    root = tmp_path_factory.mktemp("inputs")
    _make_inputs(root, ycb_root)
    out = tmp_path_factory.mktemp("prepared") / "out"
    cfg = small_test_config(max_faces=50_000, shard_size=2, sharp_edge_fraction=0.1)
    result = prepare_dataset(root, out, cfg, progress=False)
    return root, out, cfg, result


def test_every_input_becomes_a_row_or_an_error(prepared):
    root, out, cfg, result = prepared
    paths, _ = discover_inputs(root)
    assert len(paths) == 3 + len(EXPECTED_ERRORS)
    assert result.processed == 3 and result.failed == len(EXPECTED_ERRORS)
    assert result.total_rows == 3 and result.total_errors == len(EXPECTED_ERRORS)
    assert result.to_dict()["num_rows"] == 3 and result.num_errors == len(EXPECTED_ERRORS)
    assert "3 new rows" in result.summary()
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    by_name = {Path(e["source_path"]).name: e for e in errors}
    assert set(by_name) == set(EXPECTED_ERRORS)
    for name, allowed in EXPECTED_ERRORS.items():
        assert by_name[name]["reason"] in allowed, (name, by_name[name])
        assert by_name[name]["message"]
    rows = pa.concat_tables([pq.read_table(out / s) for s in result.shards_written])
    sources = sorted(Path(p).parent.name + "/" + Path(p).name for p in rows.column("source_path").to_pylist())
    assert sources == ["013_apple/textured.obj", "037_scissors/textured.obj", "primitives/box.glb"]


def test_shards_readable_with_plain_pyarrow_and_manifest_hashes(prepared):
    _, out, cfg, result = prepared
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema_version"] == 1
    assert manifest["counts"]["rows"] == 3 and manifest["counts"]["errors"] == len(EXPECTED_ERRORS)
    assert len(manifest["shards"]) == 2  # shard_size=2, sorted input order
    for entry in manifest["shards"]:
        data = (out / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    table = pq.read_table(out / manifest["shards"][0]["file"])
    assert table.num_rows == 2
    expect = {"surface_0": (2048, 6), "surface_1": (512, 6), "surface_2": (128, 6),
              "vol_points": (2048, 3), "vol_labels": (2048,), "near_points": (2048, 3),
              "images": (2, 64, 64, 4), "cam_world_to_cam": (2, 4, 4), "cam_intrinsics": (2, 3, 3),
              "view_elev_azim": (2, 2), "transform": (4, 4)}
    for name, shape in expect.items():
        col = table.column(name)
        assert isinstance(col.type, pa.FixedShapeTensorType), name
        array = col.combine_chunks().to_numpy_ndarray()
        assert array.shape == (2,) + shape, name
    surface = table.column("surface_0").combine_chunks().to_numpy_ndarray()
    assert np.abs(surface[..., :3]).max() < 1.05
    assert np.allclose(np.linalg.norm(surface[..., 3:], axis=-1), 1.0, atol=1e-3)
    assert table.column("images").type.value_type == pa.uint8()
    # Which watertight surface the geometry columns describe is recorded in both places.
    assert table.schema.metadata[b"mar3d_watertight_method"] == b"snap"
    assert manifest["config"]["watertight_method"] == "snap"
    assert all(s.startswith(h[:16]) for s, h in zip(table.column("uid").to_pylist(),
                                                     table.column("source_sha256").to_pylist()))


def test_rerun_is_idempotent_and_ignores_partial_shards(prepared):
    root, out, cfg, first = prepared
    # A crash left a half-written shard and a renamed-but-unlisted one behind.
    (out / "shards" / "shard-00007.parquet.tmp").write_bytes(b"PAR1 partial")
    shutil.copy(out / first.shards_written[0], out / "shards" / "shard-00009.parquet")
    again = prepare_dataset(root, out, cfg, progress=False)
    assert again.processed == 0 and again.failed == 0
    assert again.skipped == 3 + len(EXPECTED_ERRORS)
    assert again.total_rows == first.total_rows and again.total_errors == first.total_errors
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard-00000.parquet", "shard-00001.parquet"]
    assert len(ShapeDataset(out, num_occ=512)) == 3


def test_rerun_with_another_watertight_method_is_refused(prepared):
    root, out, cfg, _ = prepared
    before = (out / "manifest.json").read_bytes()
    other = small_test_config(max_faces=50_000, shard_size=2, sharp_edge_fraction=0.1,
                              watertight_method="offset")
    with pytest.raises(ValueError, match="watertight_method='snap'.*new output directory"):
        prepare_dataset(root, out, other, progress=False)
    assert (out / "manifest.json").read_bytes() == before


def test_corrupt_shard_is_reprocessed(tmp_path, ycb_small_dir, ray_local):
    cfg = small_test_config(shard_size=1)
    inputs = tmp_path / "in"
    inputs.mkdir()
    os.symlink(ycb_small_dir / "077_rubiks_cube", inputs / "cube")
    out = tmp_path / "out"
    first = prepare_dataset(inputs, out, cfg, progress=False)
    assert first.processed == 1
    shard = out / first.shards_written[0]
    shard.write_bytes(shard.read_bytes()[:-100])  # no longer matches the manifest's hash
    second = prepare_dataset(inputs, out, cfg, progress=False)
    assert second.processed == 1 and second.total_rows == 1
    assert second.shards_written == ["shards/shard-00000.parquet"]


def test_manifest_input_rejects_paths_escaping_root(tmp_path, ycb_root, ray_local):
    root = tmp_path / "data"
    (root / "meshes").mkdir(parents=True)
    trimesh.creation.box().export(root / "meshes" / "box.stl")
    outside = tmp_path / "outside.stl"
    trimesh.creation.box().export(outside)
    manifest = root / "list.jsonl"
    manifest.write_text("\n".join(json.dumps(p) for p in [
        "meshes/box.stl", "../outside.stl", str(outside), {"path": "meshes/missing.obj"}]) + "\n")
    result = prepare_dataset(manifest, tmp_path / "out", small_test_config(), progress=False)
    assert result.processed == 1 and result.failed == 3
    reasons = sorted(e["reason"] for e in pq.read_table(tmp_path / "out" / "errors.parquet").to_pylist())
    assert reasons == ["not_found", "path_outside_root", "path_outside_root"]
    csv_manifest = root / "list.csv"
    csv_manifest.write_text("path\nmeshes/box.stl\n../../etc/passwd\n")
    paths, errors = discover_inputs(csv_manifest)
    assert [Path(p).name for p in paths] == ["box.stl"] and errors[0]["reason"] == "path_outside_root"


def test_shape_dataset_shapes(prepared):
    _, out, _, _ = prepared
    ds = ShapeDataset(out, surface_sizes=(1024, 256, 64), num_occ=1000, seed=0)
    item = ds[0]
    assert item["surface_0"].shape == (1024, 6) and item["surface_2"].shape == (64, 6)
    assert item["occ_points"].shape == (1000, 3) and item["occ_labels"].shape == (1000,)
    assert item["occ_labels"].dtype.is_floating_point and item["image"].shape == (64, 64, 4)
    assert int(item["view_index"]) in (0, 1) and isinstance(item["uid"], str)
    again = ds[0]
    assert np.array_equal(item["surface_0"].numpy(), again["surface_0"].numpy())  # seeded
    ds.set_epoch(1)
    assert not np.array_equal(item["surface_0"].numpy(), ds[0]["surface_0"].numpy())
    with pytest.raises(ValueError):
        ShapeDataset(out, surface_sizes=(4096,))
    with pytest.raises(ValueError):
        ShapeDataset(out, num_occ=100_000)


def test_rotation_keeps_labels_consistent(prepared):
    """A rotated box: un-rotating the occupancy points must give the box's own labels."""
    _, out, _, _ = prepared
    plain = ShapeDataset(out, num_occ=2000, seed=3, view_index=0)
    idx = next(i for i in range(len(plain)) if plain[i]["uid"].endswith("box"))
    box_row = plain.read_row(idx)
    # Half extents of the normalized box (1.0, 0.6, 0.4 -> scaled so the longest is 1),
    # grown by the watertight offset; compare only points clearly away from the surface.
    half = np.abs(box_row["surface_0"][:, :3]).max(0)
    rotated = ShapeDataset(out, num_occ=2000, seed=3, rotate=True, view_index=0)
    for epoch in range(3):
        rotated.set_epoch(epoch)
        item = rotated[idx]
        rot = item["rotation"].numpy().astype(np.float64)  # rotation times rescale factor
        assert not np.allclose(rot, np.eye(3))
        back = item["occ_points"].numpy() @ np.linalg.inv(rot).T
        margin = np.min(half - np.abs(back), axis=1)
        clear = np.abs(margin) > 0.02
        truth = (margin > 0).astype(np.float32)
        labels = item["occ_labels"].numpy()
        assert (labels[clear] == truth[clear]).mean() >= 0.995
        surf = item["surface_0"].numpy()
        assert np.abs(surf[:, :3]).max() <= 1.0 + 1e-5  # rescaled back into the unit cube
        unrot = surf[:, :3] @ np.linalg.inv(rot).T
        assert np.abs(np.min(half - np.abs(unrot), axis=1)).max() < 0.03  # still on the box
        normals_back = surf[:, 3:] @ (rot / np.cbrt(np.linalg.det(rot)))
        assert np.allclose(np.linalg.norm(normals_back, axis=1), 1.0, atol=1e-3)


def test_ray_dataset_rows_match_reader(prepared):
    _, out, _, _ = prepared
    ds = ray_dataset(out, surface_sizes=(512, 128, 32), num_occ=256, seed=0, view_index=1)
    rows = ds.take_all()
    assert len(rows) == 3
    reader = ShapeDataset(out, surface_sizes=(512, 128, 32), num_occ=256, seed=0, view_index=1)
    first = rows[0]
    assert first["surface_0"].shape == (512, 6) and first["occ_points"].shape == (256, 3)
    expected = reader.sample(0)
    assert first["uid"] == expected["uid"]
    assert np.array_equal(first["surface_1"], expected["surface_1"])
    assert first["image"].shape == (64, 64, 4)


def test_splits_keep_validation_objects_and_the_held_out_view_from_training(prepared):
    """3 rows: 1 validation object (at most half), 2 training objects whose random views
    never include the held-out view (the last of 2). Decoded rows are cached per reader
    and a reader without occupancy/image never decodes those columns."""
    _, out, _, _ = prepared
    every = ShapeDataset(out, num_occ=256, seed=None)
    split = every.split_info
    assert split.holdout_view == 1 and len(split.val) == 1 and len(split.train) == 2
    train = ShapeDataset(out, num_occ=256, seed=None, split="train", cache_rows=8)
    val = ShapeDataset(out, num_occ=256, seed=0, split="val")
    assert sorted(train.uids) == sorted(split.train) and val.uids == sorted(split.val)
    assert {int(train[i % 2]["view_index"]) for i in range(40)} == {0}
    assert {int(every[i % 3]["view_index"]) for i in range(60)} == {0, 1}
    assert len(train._cache) == 2 and train.read_row(0) is train.read_row(0)
    lean = ShapeDataset(out, num_occ=256, split="train", with_occupancy=False, with_image=False)
    item = lean[0]
    assert "occ_points" not in item and "image" not in item and "surface_0" in item
    with pytest.raises(ValueError, match="split"):
        ShapeDataset(out, split="test")
