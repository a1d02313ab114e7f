"""The whole cascade end to end: the generated shape follows the image condition.

Tiny Pyramid VAE, MAR-LR and MAR-HR trained on four real YCB objects (their rendered
views as conditions) on CPU through Ray Train + DeepSpeed (2 gloo workers), tracked in
a real MLflow server: the session's pipeline run on the 2-node cluster
(``cluster_pipeline``, tests/_pipeline_run.py; 300 steps per stage on every object and
view). Its promoted release is loaded from the registry with
``MAR3DPipeline.from_pretrained("models:/...@champion")``. From views 0 and 1 of each
object, with two sampling seeds, shapes are generated and extracted (64^3); their Chamfer
distances to every object's ground-truth surface give 4x4 matrices (rows: generated
from, columns: GT).

If the condition were ignored, every row would be (about) the same shape and the
diagonal could not beat the off-diagonal cells on average. The test asserts the pooled
mean own-object distance is below the mean distance to the other objects, for LR+HR and
for LR only, and prints matrices next to the VAE's own reconstruction (the reference the
generator is working towards) and how many rows the diagonal wins (chance: 1 in 4).
Across training runs the pooled own/others ratio was 0.32-0.53 for LR only and
0.26-0.78 for LR+HR, and the diagonal won 4-15 of 16 rows: a 300-step tiny HR stage is
the weakest link, and the thin scissors are the shape most often generated nearer
another object.
"""
from __future__ import annotations

import numpy as np
import pytest

from _cascade import chamfer_matrix, load_ground_truth, reconstruction_matrix

pytestmark = pytest.mark.e2e

SEED = 0
RESOLUTION = 64
# The criterion, pooled over views and sampling seeds: generated shapes are closer
# to their own ground truth than to the other objects' on average. Measured pooled ratios
# own/others after 300 steps per stage: LR only 0.32-0.53, LR+HR 0.26-0.78 (the HR stage
# is the least trained); single draws vary more, so no single draw is asserted on.
VIEWS = (0, 1)
NUM_SEEDS = 2


@pytest.fixture(scope="module")
def cascade(cluster_pipeline):
    return cluster_pipeline.data, cluster_pipeline.stages, cluster_pipeline.release_uri


def _check_follows_condition(all_scores, label: str) -> None:
    """Pooled over views x seeds: one sampled shape per (object, view, seed) is noisy for a
    300-step tiny model, so the criterion is on the pool, as the issue states it: closer
    to its own ground truth than to the other objects' on average."""
    for scores in all_scores:
        n = len(scores.uids)
        empty = [scores.uids[i] for i in range(n) if not np.isfinite(scores.chamfer[i]).all()]
        assert not empty, (f"{label}: generation from {empty} produced no surface (Chamfer = inf); "
                           "the trained cascade decodes to an empty occupancy field")
    own = np.mean([s.own.mean() for s in all_scores])
    others = np.mean([s.others.mean() for s in all_scores])
    assert own < others, (
        f"{label}: generated shapes are not closer to their own object than to the others "
        f"(mean own CD {own:.4f} vs others {others:.4f}); the condition is not used")


def test_generated_shape_follows_its_condition(cascade, mlflow_server, capsys):
    from mar3d.inference import PipelineConfig, MAR3DPipeline
    from mar3d.train import load_train_config

    shards, results, release = cascade
    for stage, result in results.items():
        assert result.metrics["step"] == result.steps, (stage, result.metrics)
    truths = load_ground_truth(shards)
    assert len(truths) == 4, [t.uid for t in truths]

    pipe = MAR3DPipeline.from_pretrained(release, PipelineConfig(resolution=RESOLUTION), device="cpu",
                                         tracking_uri=mlflow_server)
    assert pipe.uses_hr
    pooled = {use_hr: [chamfer_matrix(pipe, truths, view=view, seed=SEED + k, use_hr=use_hr,
                                      resolution=RESOLUTION)
                       for view in VIEWS for k in range(NUM_SEEDS)]
              for use_hr in (True, False)}
    surface_sizes = load_train_config("vae", "train_vae_tiny").surface_sizes
    reference = reconstruction_matrix(pipe, shards, truths, surface_sizes, level="hr",
                                      resolution=RESOLUTION)
    with capsys.disabled():
        print()
        for use_hr, label in ((True, "LR+HR"), (False, "LR only")):
            for scores in pooled[use_hr][:2]:
                print(scores.table(f"Chamfer, generated ({label}) [row] vs ground truth [column]:"))
            s = pooled[use_hr]
            print(f"{label} pooled over {len(s)} (view, seed) draws: mean own "
                  f"{np.mean([x.own.mean() for x in s]):.4f}, others {np.mean([x.others.mean() for x in s]):.4f}, "
                  f"rows won {sum(x.rows_won() for x in s)}/{sum(len(x.uids) for x in s)}")
        print("VAE HR reconstruction (reference) diagonal:", np.round(np.diag(reference), 4))

    _check_follows_condition(pooled[True], "LR+HR")
    _check_follows_condition(pooled[False], "LR only")


def test_worse_release_is_refused_and_batch_generation_accounts_for_every_input(
        cascade, mlflow_server, tmp_path):
    """The release lifecycle past the pipeline's own promotion, on a real `mlflow server`:
    the pipeline's champion stays champion when a deliberately worse release (untrained
    MAR-LR/HR on the same VAE), evaluated as the pipeline evaluates, is refused; batch
    generation from the champion over rendered YCB views plus broken images accounts for
    every input; evaluation and generation runs name their data and models (lineage)."""
    import mlflow
    import pyarrow.parquet as pq
    import trimesh
    from PIL import Image

    from _pipeline_run import MODEL_NAME
    from mar3d.config import load_config
    from mar3d.evaluate import EvalConfig, evaluate
    from mar3d.generate import GenerateConfig, batch_generate
    from mar3d.inference import PipelineConfig
    from mar3d.gate import GateConfig
    from mar3d.registry import RegistryConfig, get_release, promote, register_release

    from _tiny_release import write_tiny_release

    shards, results, champion_uri = cascade
    registry = RegistryConfig(name=MODEL_NAME)
    good = get_release(champion_uri, mlflow_server)
    # The pipeline's evaluation scored all 4 objects (its two groups hold 2 each).
    assert good.metrics["seen_view/num_scored"] + good.metrics["heldout_objects/num_scored"] == 4, good.metrics
    _check_lineage(good, good.tags["eval_run_id"], results, mlflow_server, "eval", shards)

    # Deliberately worse: randomly initialised MAR-LR/HR of the same shapes on the trained VAE.
    untrained = write_tiny_release(tmp_path / "untrained", seed=123)
    uris = {"vae": results["vae"].model_uri}
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment("test-cascade")
    for stage in ("cond", "lr", "hr"):  # its own (random) image encoder: logged, registered
        with mlflow.start_run(run_name=f"untrained-{stage}") as run:
            mlflow.log_artifacts(str(untrained / stage), "model")
        uris[stage] = f"runs:/{run.info.run_id}/model"
    worse = register_release(uris, cfg=registry, tracking_uri=mlflow_server)
    # Scored as the pipeline scores a candidate: the smoke preset's evaluation, with the
    # champion scored on the same objects (`mar3d evaluate --compare-to-champion`).
    evaluate(worse.uri, shards, tmp_path / "eval-worse", load_config(EvalConfig, "eval_tiny"),
             tracking_uri=mlflow_server, release_uri=worse.uri, progress=False, compare_to=champion_uri)
    # The pipeline's gate on its held-out group, here compared with the champion only.
    refused = promote(worse.uri, gate=GateConfig(rel_tolerance=0.05, beat_baseline=False), cfg=registry,
                      tracking_uri=mlflow_server)
    print("\nchampion:", good.metrics, "\nrefused promotion:\n" + refused.table())
    assert not refused.passed, refused.table()
    assert get_release(champion_uri, mlflow_server).version == good.version

    # Batch generation over rendered YCB views (written as PNG) plus broken images.
    images = tmp_path / "images"
    images.mkdir()
    for truth in load_ground_truth(shards):
        for view in range(truth.views.shape[0]):
            Image.fromarray(truth.views[view]).save(images / f"{truth.uid}_v{view}.png")
    (images / "truncated.png").write_bytes((images / f"{truth.uid}_v0.png").read_bytes()[:100])
    Image.new("RGB", (1, 1)).save(images / "one_pixel.png")
    (images / "notes.txt").write_text("not an image")
    n_inputs = len(list(images.iterdir()))
    out = tmp_path / "generated"
    cfg = GenerateConfig(pipeline=PipelineConfig(resolution=RESOLUTION), num_actors=2,
                         cpus_per_actor=0.5, batch_size=2)
    result = batch_generate(str(images), champion_uri, str(out), cfg,
                            tracking_uri=mlflow_server, progress=False)
    rows = pq.read_table(result.results_path).to_pylist()
    assert len(rows) == n_inputs == result.total
    by_id = {r["id"]: r for r in rows}
    for bad in ("truncated.png", "one_pixel.png", "notes.txt"):
        assert by_id[bad]["status"] == "error" and by_id[bad]["error"], by_id[bad]
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) + sum(r["status"] == "error" for r in rows) == n_inputs
    valid = n_inputs - 3
    assert len(ok) >= valid // 2, [(r["id"], r["reason"]) for r in rows if r["status"] != "ok"]
    for r in rows:
        if r["status"] == "error":
            assert r["reason"] and r["error"], r
        for path in r["outputs"]:
            assert len(trimesh.load(out / path, force="mesh").faces) > 0
    _check_lineage(good, result.run_id, results, mlflow_server, "generate", images)


def _check_lineage(release, run_id: str, results, tracking_uri: str, context: str, data) -> None:
    """Read back through the MLflow client: the release's component versions name the
    logged models their training runs produced, and the evaluation / generation run logged
    its data as a dataset input (role ``context``) and those models as its model inputs."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    produced = {}
    for stage in ("vae", "lr", "hr"):
        name, version = release.components[stage]
        produced[stage] = client.get_model_version(name, version).tags["mar3d.logged_model_id"]
        assert produced[stage] == client.get_run(results[stage].run_id).data.tags["mar3d.logged_model_id"]
    run = client.get_run(run_id)
    inputs = [d.dataset for d in run.inputs.dataset_inputs
              if {t.key: t.value for t in d.tags}.get("mlflow.data.context") == context]
    assert len(inputs) == 1 and str(data) in inputs[0].source, run.inputs.dataset_inputs
    assert set(produced.values()) <= {m.model_id for m in run.inputs.model_inputs}, run.inputs.model_inputs
