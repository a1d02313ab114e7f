import json
import math
import os

import numpy as np
import pytest
import trimesh

from mar3d.config import ConfigError, load_config
from mar3d.data.render import intrinsics_matrix, look_at
from mar3d.evaluate import (EvalConfig, aggregate, assemble_release_dir, cross_chamfer, pairwise_chamfer,
                            dataset_fingerprint, evaluate, evaluate_components, evaluation_table,
                            category_following, following_metrics, per_category)
from mar3d.inference import PipelineConfig
from mar3d.models.mar import SamplingConfig
from mar3d.models.vae import occupancy_iou
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


def _shapes(n: int = 5, points: int = 1500) -> list[np.ndarray]:
    """Spheres and boxes of different sizes: distinct shapes as point sets."""
    out = []
    for i in range(n):
        mesh = (trimesh.creation.icosphere(subdivisions=3, radius=0.3 + 0.15 * i) if i % 2 == 0
                else trimesh.creation.box(extents=(0.4 + 0.2 * i, 0.5, 0.3 + 0.1 * i)))
        out.append(np.asarray(trimesh.sample.sample_surface(mesh, points, seed=i)[0]))
    return out


def test_pairwise_chamfer_is_the_cross_matrix_of_a_list_with_itself():
    shapes = _shapes(4, 400)
    assert np.array_equal(pairwise_chamfer(shapes), cross_chamfer(shapes, shapes))
    assert pairwise_chamfer(shapes[:1]).tolist() == [[0.0]]


def test_retrieval_and_diversity_tell_a_conditioned_model_from_a_constant_one():
    truths = _shapes()
    n = len(truths)
    faithful = [t + 0.01 for t in truths]                # each output near its own object
    constant = [truths[2]] * n                           # one shape for every input
    swapped = [truths[(i + 1) % n] for i in range(n)]    # diverse, but never the right one
    m = following_metrics(cross_chamfer(faithful, truths), faithful, truths)
    assert m["retrieval_hits"] == n and m["retrieval_top1"] == 1.0
    assert m["diversity_ratio"] == pytest.approx(1.0, abs=0.1) and m["retrieval_chance"] == 1 / n
    c = following_metrics(cross_chamfer(constant, truths), constant, truths)
    assert c["retrieval_hits"] <= 1 and c["diversity_ratio"] == 0.0
    w = following_metrics(cross_chamfer(swapped, truths), swapped, truths)
    assert w["retrieval_hits"] == 0 and w["diversity_ratio"] > 0.5
    failed = following_metrics(cross_chamfer([None] + faithful[1:], truths), [None] + faithful[1:], truths)
    assert failed["retrieval_hits"] == n - 1  # a failure is a miss, never skipped


def test_category_accuracy_counts_nearest_ground_truths_of_the_own_category():
    truths = _shapes()  # 5 shapes: two "cup", two "box", one "ball"
    categories = ["cup", "cup", "box", "box", "ball"]
    n = len(truths)
    near_a_sibling = [truths[[1, 0, 3, 2, 4][i]] + 0.01 for i in range(n)]  # wrong object, right category
    m = category_following(cross_chamfer(near_a_sibling, truths), categories)
    assert m["category_hits"] == n and m["category_accuracy"] == 1.0
    assert following_metrics(cross_chamfer(near_a_sibling, truths), near_a_sibling, truths)["retrieval_hits"] == 1
    assert m["category_chance"] == pytest.approx((2 / 5) ** 2 * 2 + (1 / 5) ** 2)
    constant = [truths[4]] * n  # a constant output scores its own category's share
    assert category_following(cross_chamfer(constant, truths), categories)["category_accuracy"] == 1 / 5
    failed = [None] + near_a_sibling[1:]
    assert category_following(cross_chamfer(failed, truths), categories)["category_hits"] == n - 1
    assert category_following(cross_chamfer(constant, truths), ["cup", None, "box", "box", "ball"]) == {}
    records = [{"status": "ok", "chamfer": 0.1 * (i + 1), "f_score": 0.2 * i} for i in range(n)]
    rows = per_category(categories, {"": (cross_chamfer(near_a_sibling, truths), records),
                                     "baseline_": (cross_chamfer(constant, truths), records)})
    assert [r["category"] for r in rows] == ["ball", "box", "cup"]
    cup = rows[2]
    assert cup["objects"] == 2 and cup["f_score"] == pytest.approx(0.1) and cup["chamfer"] == pytest.approx(0.15)
    assert cup["category_accuracy"] == 1.0 and cup["baseline_category_accuracy"] == 0.0
    assert rows[0]["baseline_category_accuracy"] == 1.0  # the constant is the ball


def test_mean_shape_baseline_is_the_best_constant_prediction():
    """The baseline is the training shape nearest to all others on average: no other
    constant output (any training shape, for every input) has a lower mean Chamfer to the
    pool, and any constant output retrieves at most one object and has no diversity."""
    pool = _shapes(6)
    matrix = cross_chamfer(pool, pool)
    np.fill_diagonal(matrix, 0.0)
    means = matrix.sum(1) / (len(pool) - 1)
    medoid = int(np.argmin(means))
    for c in range(len(pool)):
        constant = [pool[c]] * len(pool)
        row = cross_chamfer([pool[c]], pool)[0]
        assert row.mean() >= cross_chamfer([pool[medoid]], pool)[0].mean() - 1e-12
        m = following_metrics(cross_chamfer(constant, pool), constant, pool)
        assert m["retrieval_hits"] <= 1 and m["diversity_ratio"] == 0.0


def test_evaluation_table_puts_candidate_next_to_baseline():
    metrics = {"seen_view/num_objects": 4.0, "seen_view/f_score": 0.5, "seen_view/retrieval_top1": 0.75,
               "seen_view/retrieval_hits": 3.0, "seen_view/baseline/num_objects": 4.0,
               "seen_view/baseline/f_score": 0.2, "seen_view/baseline/retrieval_top1": 0.25,
               "seen_view/baseline/retrieval_hits": 1.0}
    table = evaluation_table(metrics)
    assert "| candidate | mean-shape baseline |" in table
    assert "| top-1 retrieval ↑ | 3/4 | 1/4 |" in table and "0.5000 | 0.2000" in table


def test_occupancy_iou():
    labels = np.array([1, 1, 0, 0], np.uint8)
    assert occupancy_iou(np.array([2.0, -1.0, 3.0, -2.0]), labels) == pytest.approx(1 / 3)
    assert occupancy_iou(np.full(4, -1.0), np.zeros(4, np.uint8)) == 1.0
    with pytest.raises(ValueError, match="labels"):
        occupancy_iou(np.zeros(3), labels)


def test_eval_config_loads_nested_and_validates(tmp_path):
    cfg = load_config(EvalConfig, None, ["pipeline.resolution=32", "max_objects=2", "previews=0"])
    assert cfg.pipeline.resolution == 32 and cfg.max_objects == 2
    assert cfg.groups == ("seen_view", "heldout_objects") and cfg.view_index is None
    for bad in (["num_points=0"], ["fscore_threshold=0"], ["preview_resolution=8"],
                ["max_objects=0"], ["pipeline.resolution=4"], ["device=tpu"], ["groups=[]"],
                ["groups=[seen_view, seen_view]"], ["groups=[train]"], ["retrieval_points=0"]):
        with pytest.raises((ValueError, ConfigError)):
            load_config(EvalConfig, None, bad)
    with pytest.raises(ConfigError, match="unknown"):
        load_config(EvalConfig, None, ["nonsense=1"])


def test_assemble_release_dir_links_local_components(tmp_path):
    release = write_tiny_release(tmp_path / "rel")
    out = assemble_release_dir(str(release / "vae"), str(release / "lr"), None, tmp_path / "assembled")
    assert (out / "vae" / "model.safetensors").is_file() and (out / "lr").is_symlink()
    assert not (out / "hr").exists()
    # The image encoder is the one the MAR model records it was trained with.
    assert (out / "cond").resolve() == (release / "cond").resolve()
    with pytest.raises(FileExistsError):
        assemble_release_dir(str(release / "vae"), str(release / "lr"), None, out)


# ------------------------------------------------------------------------------ e2e
TINY = dict(sampling=SamplingConfig(num_inference_steps=4, diffusion_steps=5), resolution=32)


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
        for component in ("vae", "cond", "lr", "hr"):
            mlflow.log_artifacts(str(release / component), component)
    uris = {c: f"runs:/{run.info.run_id}/{c}" for c in ("vae", "cond", "lr", "hr")}
    rel = register_release(uris, cfg=RegistryConfig(name="mar3d-evaltest"), tracking_uri=tracking_uri)
    return f"models:/{rel.name}/{rel.version}"


@pytest.mark.e2e
def test_evaluate_release_logs_to_mlflow_and_registry(eval_shards, mlflow_server, tmp_path):
    from mlflow import MlflowClient

    from mar3d.registry import get_release

    release_uri = _registered_tiny_release(mlflow_server, tmp_path / "release")
    cfg = EvalConfig(pipeline=PipelineConfig(**TINY), num_points=4000, previews=1,
                     preview_resolution=64, contact_sheet_resolution=64, device="cpu",
                     experiment="test-eval")
    result = evaluate(release_uri, str(eval_shards), tmp_path / "out", cfg, tracking_uri=mlflow_server,
                      release_uri=release_uri, progress=False)

    # Two objects: one training object (scored from its held-out view 1), one held out.
    report = json.loads(result.report_path.read_text())
    assert len(report["per_object"]) == 2 == len(result.per_object)
    assert report["dataset_fingerprint"]["hash"] == dataset_fingerprint(eval_shards)["hash"]
    groups = report["groups"]
    assert set(groups) == {"seen_view", "heldout_objects"}
    assert not set(groups["seen_view"]["objects"]) & set(groups["heldout_objects"]["objects"])
    for row in result.per_object:
        assert row["level"] == "hr" and row["view"] == 1 and row["group"] in groups
        assert 0 <= row["vae_iou"] <= 1
        if row["status"] == "ok":
            for key in ("chamfer", "f_score", "normal_consistency", "iou"):
                assert math.isfinite(row[key]), (key, row)
            assert 0 <= row["f_score"] <= 1 and 0 <= row["iou"] <= 1
        else:
            assert row["error"] and row["f_score"] == 0.0
    m = result.metrics
    for group in groups:
        assert m[f"{group}/num_objects"] == 1 and m[f"{group}/num_scored"] + m[f"{group}/num_failed"] == 1
        # The baseline (the one training object's own surface) is scored on the same object.
        assert groups[group]["baseline"]["uid"] == groups["seen_view"]["objects"][0]
        assert f"{group}/baseline/f_score" in m and f"{group}/retrieval_top1" in m
    assert m["seen_view/baseline/chamfer"] == pytest.approx(0.0, abs=1e-9)  # its own surface
    assert len(result.failed) == sum(m[f"{g}/num_failed"] for g in groups)
    assert set(result.contact_sheets) == set(groups)
    for path in result.contact_sheets.values():
        from PIL import Image

        assert Image.open(path).size[0] >= 5 * 64  # input | generated x2 | ground truth x2

    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["seen_view/f_score"] == pytest.approx(m["seen_view/f_score"])
    assert run.data.metrics["heldout_objects/num_objects"] == 1
    assert run.data.params["model"] == release_uri and run.data.params["eval.pipeline.resolution"] == "32"
    assert run.data.params["dataset.hash"] == report["dataset_fingerprint"]["hash"]
    artifacts = {f.path for f in client.list_artifacts(result.run_id)}
    assert {"report.json", "per_object.csv", "per_object_table.json", "previews",
            "contact_sheets", "chamfer_seen_view.csv"} <= artifacts
    sheets = [f.path for f in client.list_artifacts(result.run_id, "contact_sheets")]
    assert sorted(sheets) == ["contact_sheets/heldout_objects.png", "contact_sheets/seen_view.png"]
    previews = [f.path for f in client.list_artifacts(result.run_id, "previews")]
    assert len(previews) == 2 and all(p.endswith(".png") for p in previews)
    table = json.loads(open(client.download_artifacts(result.run_id, "per_object_table.json",
                                                      str(tmp_path))).read())
    assert len(table["data"]) == 2 and "chamfer" in table["columns"]
    # One rotatable 3D page per group, logged; the MLflow UI's artifact view shows it
    # (a real browser: the view drew a shape and a drag turns the panel's views together).
    assert report["view_pages"] == {g: f"views/{g}.html" for g in groups}
    assert sorted(f.path for f in client.list_artifacts(result.run_id, "views")) == [
        "views/heldout_objects.html", "views/seen_view.html"]
    from _browser import check_view_turns, chromium_page, page_frame
    from _credentials import SESSION_CREDENTIALS

    account = {"username": SESSION_CREDENTIALS["MLFLOW_TRACKING_USERNAME"],
               "password": SESSION_CREDENTIALS["MLFLOW_TRACKING_PASSWORD"]}
    with chromium_page(http_credentials=account) as page:
        page.goto(f"{mlflow_server}/#/experiments/{run.info.experiment_id}/runs/{result.run_id}"
                  "/artifacts/views/seen_view.html")
        check_view_turns(page, page_frame(page), "mlflow_ui_view.png")

    # The promotion gate reads the metrics (and the protocol of each group) from the release.
    rel = get_release(release_uri, mlflow_server)
    assert rel.tags["eval_run_id"] == result.run_id
    assert rel.metrics["heldout_objects/f_score"] == pytest.approx(m["heldout_objects/f_score"])
    assert rel.tags["eval.heldout_objects.protocol"] == groups["heldout_objects"]["protocol"]


@pytest.mark.e2e
def test_evaluate_components_lr_only(eval_shards, tmp_path):
    release = write_tiny_release(tmp_path / "release")
    cfg = EvalConfig(pipeline=PipelineConfig(use_hr=False, **TINY), num_points=2000, previews=0,
                     with_iou=False, max_objects=1, device="cpu", contact_sheet=False,
                     groups=("all_objects",))
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = evaluate_components(str(release / "vae"), str(release / "lr"), None, eval_shards,
                                 tmp_path / "out", cfg, tracking_uri=tracking_uri, progress=False)
    assert len(result.per_object) == 1 and result.per_object[0]["level"] == "lr"
    assert "iou" not in result.per_object[0] and "all_objects/iou" not in result.metrics
    assert result.metrics["all_objects/num_objects"] == 1 and not result.contact_sheets
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
    cfg = EvalConfig(pipeline=PipelineConfig(min_image_side=128, **TINY), previews=1,
                     preview_resolution=64, contact_sheet_resolution=64, device="cpu")
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = evaluate(str(release), eval_shards, tmp_path / "out", cfg, tracking_uri=tracking_uri,
                      progress=False)
    assert len(result.failed) == 2 == len(result.per_object)
    assert all("InvalidImageError" in r["error"] for r in result.failed)
    for group in ("seen_view", "heldout_objects"):
        assert result.metrics[f"{group}/num_failed"] == 1 and result.metrics[f"{group}/f_score"] == 0.0
        assert result.metrics[f"{group}/chamfer"] == math.inf
        assert result.metrics[f"{group}/retrieval_hits"] == 0  # a failure is a miss
    report = json.loads(result.report_path.read_text())  # strict JSON: inf is written as null
    assert report["metrics"]["seen_view/chamfer"] is None and report["per_object"][0]["status"] == "failed"
    assert len(list((tmp_path / "out" / "previews").glob("*_0000_*.png"))) == 2
    assert set(result.contact_sheets) == {"seen_view", "heldout_objects"}  # failures are shown too
    run = MlflowClient(tracking_uri=tracking_uri).get_run(result.run_id)
    assert "seen_view/chamfer" not in run.data.metrics
    assert run.data.tags["nonfinite.seen_view/chamfer"] == "inf"
    assert run.data.metrics["seen_view/num_failed"] == 1 and run.info.status == "FINISHED"


@pytest.mark.e2e
def test_objects_sampled_together_score_as_sampled_alone(eval_shards, tmp_path):
    from mar3d.data.dataset import ShapeDataset
    from mar3d.evaluate import EvalRows, evaluate_object, pipeline_outputs
    from mar3d.inference import MAR3DPipeline

    release = write_tiny_release(tmp_path / "release")
    cfg = EvalConfig(pipeline=PipelineConfig(**TINY), num_points=2000, device="cpu")
    pipe = MAR3DPipeline.from_pretrained(str(release), config=cfg.pipeline, device="cpu")
    reader = ShapeDataset(eval_shards, num_occ=1, near_fraction=0.0, with_image=False)
    rows = [EvalRows(reader).get(i, 0) for i in range(len(reader))]
    together = pipeline_outputs(pipe, rows, cfg)
    for i, row in enumerate(rows):
        batched, _ = evaluate_object(pipe, row, cfg, i, together[i])
        alone, _ = evaluate_object(pipe, row, cfg, i)
        assert batched["status"] == alone["status"] == "ok"
        for key in ("chamfer", "f_score", "normal_consistency", "iou"):
            assert batched[key] == pytest.approx(alone[key], rel=1e-3, abs=1e-4), key
    # A batch with an object that cannot be generated is retried object by object: the
    # others keep their shapes, the bad one is its own failure.
    broken = {**rows[0], "uid": "broken", "image": np.zeros((8, 8, 2), np.uint8)}
    outs = pipeline_outputs(pipe, [broken, rows[1]], cfg)
    assert isinstance(outs[0], Exception) and not isinstance(outs[1], Exception)
    record, mesh = evaluate_object(pipe, broken, cfg, 0, outs[0])
    assert record["status"] == "failed" and record["error"].startswith("generation:") and mesh is None
