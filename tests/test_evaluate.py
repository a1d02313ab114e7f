import json
import math
import os

import numpy as np
import pytest
import trimesh

from mar3d.config import ConfigError, load_config
from mar3d.data.render import intrinsics_matrix, look_at
from mar3d.evaluate import (EvalConfig, aggregate, assemble_release_dir, dataset_fingerprint, evaluate,
                            evaluate_components, occupancy_iou)
from mar3d.inference import GenerateConfig
from mar3d.preview import (comparison_preview, mesh_normals, render_mesh_normal_map,
                           render_points_normal_map, splat_normals)

from _shards import make_small_shards
from _tiny_release import write_tiny_release

RES, FOV, DIST, RADIUS = 128, 40.0, 3.0, 0.8


@pytest.fixture(scope="module")
def sphere_view():
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=RADIUS)
    return sphere, look_at(20.0, 30.0, DIST), intrinsics_matrix(RES, FOV)


def test_mesh_normal_map_of_sphere_faces_camera(sphere_view):
    sphere, w2c, k = sphere_view
    image = render_mesh_normal_map(sphere, w2c, k, RES)
    assert image.shape == (RES, RES, 4) and image.dtype == np.uint8
    c = RES // 2
    # View-space normal (0, 0, 1) -> (128, 128, 255): the centre faces the camera.
    assert np.abs(image[c, c, :3].astype(int) - [128, 128, 255]).max() <= 3
    # Right of centre the normal points right (red up); above centre it points up (green up).
    assert image[c, c + 30, 0] > 170 and image[c - 30, c, 1] > 170
    # Transparent background, and the silhouette has the sphere's projected area.
    assert image[0, 0, 3] == 0 and image[-1, -1, 3] == 0 and not image[0, 0, :3].any()
    radius_px = k[0, 0] * np.tan(np.arcsin(RADIUS / DIST))
    coverage = (image[..., 3] == 255).sum() / (np.pi * radius_px ** 2)
    assert 0.97 < coverage < 1.03


def test_point_splat_agrees_with_mesh_render(sphere_view):
    sphere, w2c, k = sphere_view
    points, faces = trimesh.sample.sample_surface(sphere, 16384, seed=0)
    mesh_n, mesh_mask = mesh_normals(sphere, w2c, k, RES)
    splat_n, splat_mask = splat_normals(points, sphere.face_normals[faces], w2c, k, RES)
    both = mesh_mask & splat_mask
    assert both.sum() / (mesh_mask | splat_mask).sum() > 0.9
    # Back-facing points stay hidden: normals agree on nearly all shared pixels.
    cos = (mesh_n[both] * splat_n[both]).sum(-1)
    assert (cos > 0.9).mean() > 0.95
    image = render_points_normal_map(points, sphere.face_normals[faces], w2c, k, RES)
    assert image[0, 0, 3] == 0 and image[RES // 2, RES // 2, 3] == 255


def test_splat_rejects_bad_input(sphere_view):
    _, w2c, k = sphere_view
    with pytest.raises(ValueError, match="points and normals"):
        splat_normals(np.zeros((4, 3)), np.zeros((5, 3)), w2c, k, RES)


def test_comparison_preview_has_three_panels(sphere_view):
    sphere, w2c, k = sphere_view
    points, faces = trimesh.sample.sample_surface(sphere, 4096, seed=0)
    condition = np.full((64, 64, 4), 200, np.uint8)
    # The stored intrinsics belong to the 128 px condition renders; the preview is 96 px.
    panel = comparison_preview(condition, sphere, points, sphere.face_normals[faces], w2c, k,
                               image_resolution=RES, resolution=96, caption="sphere")
    assert panel.shape == (96 + 32, 3 * 96, 3)
    generated, gt = panel[16:112, 96:192], panel[16:112, 192:288]
    assert np.abs(generated[48, 48].astype(int) - gt[48, 48]).max() < 10  # same camera, same normal
    empty = comparison_preview(condition, None, points, sphere.face_normals[faces], w2c, k,
                               image_resolution=RES, resolution=96)
    assert (empty[16:112, 96:192] == 255).all()  # failed generation: blank middle panel


def _row(status, chamfer=None, f=0.0, nc=0.0, iou=0.0, seconds=1.0):
    return {"uid": "x", "status": status, "chamfer": chamfer, "f_score": f, "precision": f,
            "recall": f, "normal_consistency": nc, "iou": iou, "seconds": seconds}


def test_aggregate_counts_failures_as_zero_and_excludes_them_from_chamfer():
    rows = [_row("ok", 0.02, 0.9, 0.8, 0.7), _row("ok", 0.04, 0.5, 0.6, 0.5), _row("failed")]
    m = aggregate(rows)
    assert m["num_objects"] == 3 and m["num_scored"] == 2 and m["num_failed"] == 1
    assert m["chamfer"] == pytest.approx(0.03)
    assert m["f_score"] == pytest.approx(1.4 / 3)
    assert m["normal_consistency"] == pytest.approx(1.4 / 3) and m["iou"] == pytest.approx(1.2 / 3)
    assert m["failure_rate"] == pytest.approx(1 / 3)
    all_failed = aggregate([_row("failed"), _row("failed")])
    assert all_failed["chamfer"] == math.inf and all_failed["f_score"] == 0.0
    with pytest.raises(ValueError, match="no objects"):
        aggregate([])


def test_occupancy_iou():
    labels = np.array([1, 1, 0, 0], np.uint8)
    assert occupancy_iou(np.array([2.0, -1.0, 3.0, -2.0]), labels) == pytest.approx(1 / 3)
    assert occupancy_iou(np.full(4, -1.0), np.zeros(4, np.uint8)) == 1.0
    with pytest.raises(ValueError, match="labels"):
        occupancy_iou(np.zeros(3), labels)


def test_eval_config_loads_nested_and_validates(tmp_path):
    cfg = load_config(EvalConfig, None, ["generate.resolution=32", "max_objects=2", "previews=0"])
    assert cfg.generate.resolution == 32 and cfg.max_objects == 2
    for bad in (["num_points=0"], ["fscore_threshold=0"], ["preview_resolution=8"],
                ["max_objects=0"], ["generate.resolution=4"], ["device=tpu"]):
        with pytest.raises((ValueError, ConfigError)):
            load_config(EvalConfig, None, bad)
    with pytest.raises(ConfigError, match="unknown"):
        load_config(EvalConfig, None, ["nonsense=1"])


def test_assemble_release_dir_links_local_components(tmp_path):
    release = write_tiny_release(tmp_path / "rel")
    out = assemble_release_dir(str(release / "vae"), str(release / "lr"), None, tmp_path / "assembled")
    assert (out / "vae" / "model.safetensors").is_file() and (out / "lr").is_symlink()
    assert not (out / "hr").exists()
    with pytest.raises(FileExistsError):
        assemble_release_dir(str(release / "vae"), str(release / "lr"), None, out)


# ------------------------------------------------------------------------------ e2e
TINY = dict(num_iters=4, diffusion_steps=5, resolution=32)


@pytest.fixture(scope="module")
def eval_shards(tmp_path_factory, ycb_root, ray_local):
    meshes = tmp_path_factory.mktemp("eval_meshes")
    for name in ("013_apple", "077_rubiks_cube"):
        os.symlink(ycb_root / name, meshes / name)
    return make_small_shards(meshes, tmp_path_factory.mktemp("eval_shards") / "data")


def _registered_tiny_release(tracking_uri: str, root) -> str:
    """Log the tiny release's folders as run artifacts and register them as a release."""
    import mlflow

    from mar3d.registry import RegistryConfig, register_release

    release = write_tiny_release(root)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("test-eval-models")
    with mlflow.start_run(run_name="tiny-release") as run:
        for component in ("vae", "lr", "hr"):
            mlflow.log_artifacts(str(release / component), component)
    uris = {c: f"runs:/{run.info.run_id}/{c}" for c in ("vae", "lr", "hr")}
    rel = register_release(uris, cfg=RegistryConfig(name="mar3d-evaltest"), tracking_uri=tracking_uri)
    return f"models:/{rel.name}/{rel.version}"


@pytest.mark.e2e
def test_evaluate_release_logs_to_mlflow_and_registry(eval_shards, mlflow_server, tmp_path):
    from mlflow import MlflowClient

    from mar3d.registry import get_release

    release_uri = _registered_tiny_release(mlflow_server, tmp_path / "release")
    cfg = EvalConfig(generate=GenerateConfig(**TINY), num_points=4000, previews=2,
                     preview_resolution=64, device="cpu", experiment="test-eval")
    result = evaluate(release_uri, str(eval_shards), tmp_path / "out", cfg, tracking_uri=mlflow_server,
                      release_uri=release_uri, progress=False)

    report = json.loads(result.report_path.read_text())
    assert len(report["per_object"]) == 2 == len(result.per_object)
    assert report["dataset_fingerprint"]["hash"] == dataset_fingerprint(eval_shards)["hash"]
    for row in result.per_object:
        assert row["level"] == "hr" and row["view"] == 0
        if row["status"] == "ok":
            for key in ("chamfer", "f_score", "normal_consistency", "iou"):
                assert math.isfinite(row[key]), (key, row)
            assert 0 <= row["f_score"] <= 1 and 0 <= row["iou"] <= 1
        else:
            assert row["error"] and row["f_score"] == 0.0
    m = result.metrics
    assert m["num_objects"] == 2 and m["num_scored"] + m["num_failed"] == 2
    assert len(result.failed) == m["num_failed"]

    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["f_score"] == pytest.approx(m["f_score"])
    assert run.data.metrics["num_objects"] == 2
    assert run.data.params["model"] == release_uri and run.data.params["eval.generate.resolution"] == "32"
    assert run.data.params["dataset.hash"] == report["dataset_fingerprint"]["hash"]
    artifacts = {f.path for f in client.list_artifacts(result.run_id)}
    assert {"report.json", "per_object.csv", "per_object_table.json", "previews"} <= artifacts
    previews = [f.path for f in client.list_artifacts(result.run_id, "previews")]
    assert len(previews) == 2 and all(p.endswith(".png") for p in previews)
    table = json.loads(open(client.download_artifacts(result.run_id, "per_object_table.json",
                                                      str(tmp_path))).read())
    assert len(table["data"]) == 2 and "chamfer" in table["columns"]

    # The promotion gate reads the metrics from the release itself.
    rel = get_release(release_uri, mlflow_server)
    assert rel.tags["eval_run_id"] == result.run_id
    assert rel.metrics["f_score"] == pytest.approx(m["f_score"])


@pytest.mark.e2e
def test_evaluate_components_lr_only(eval_shards, tmp_path):
    release = write_tiny_release(tmp_path / "release")
    cfg = EvalConfig(generate=GenerateConfig(use_hr=False, **TINY), num_points=2000, previews=0,
                     with_iou=False, max_objects=1, device="cpu")
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = evaluate_components(str(release / "vae"), str(release / "lr"), None, eval_shards,
                                 tmp_path / "out", cfg, tracking_uri=tracking_uri, progress=False)
    assert len(result.per_object) == 1 and result.per_object[0]["level"] == "lr"
    assert "iou" not in result.per_object[0] and "iou" not in result.metrics
    from mlflow import MlflowClient

    params = MlflowClient(tracking_uri=tracking_uri).get_run(result.run_id).data.params
    assert params["model.vae"] == str(release / "vae")
    with pytest.raises(ValueError, match="hr_uri"):
        evaluate_components(str(release / "vae"), str(release / "lr"), None, eval_shards,
                            tmp_path / "out2", EvalConfig(), tracking_uri=tracking_uri)


@pytest.mark.e2e
def test_failed_objects_are_recorded_not_skipped(eval_shards, tmp_path):
    """Images below the pipeline's minimum size fail generation for every object: each
    failure is a row with its reason, the aggregates say so, and nothing is dropped."""
    from mlflow import MlflowClient

    release = write_tiny_release(tmp_path / "release")
    cfg = EvalConfig(generate=GenerateConfig(min_image_side=128, **TINY), previews=1,
                     preview_resolution=64, device="cpu")
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = evaluate(str(release), eval_shards, tmp_path / "out", cfg, tracking_uri=tracking_uri,
                      progress=False)
    assert len(result.failed) == 2 == len(result.per_object)
    assert all("InvalidImageError" in r["error"] for r in result.failed)
    assert result.metrics["num_failed"] == 2 and result.metrics["f_score"] == 0.0
    assert result.metrics["chamfer"] == math.inf
    report = json.loads(result.report_path.read_text())  # strict JSON: inf is written as null
    assert report["metrics"]["chamfer"] is None and report["per_object"][0]["status"] == "failed"
    assert len(list((tmp_path / "out" / "previews").glob("0000_*.png"))) == 1
    run = MlflowClient(tracking_uri=tracking_uri).get_run(result.run_id)
    assert "chamfer" not in run.data.metrics and run.data.tags["nonfinite.chamfer"] == "inf"
    assert run.data.metrics["num_failed"] == 2 and run.info.status == "FINISHED"
