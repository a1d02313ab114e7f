"""The feature/latent cache for MAR training (mar3d/train/feature_cache.py), on real YCB
shards with a real Ray Data job: what it stores equals what an uncached training step
computes, failures are error rows, a cache of other inputs is refused, and MAR-LR and
MAR-HR train from it (the session's pipeline run on the cluster: Ray Data stream,
DeepSpeed, MLflow).

All of it needs Ray (the shards and the cache are Ray Data jobs), hence ``e2e``."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from _pipeline_run import SMALL_CONDITION
from mar3d.config import load_config, to_dict
from mar3d.data.dataset import ShapeDataset
from mar3d.inference import save_conditioner
from mar3d.models.condition import ConditionConfig, ImageEncoder
from mar3d.models.vae import ShapeVAE, VAEConfig
from mar3d.train import load_train_config, run_training
from mar3d.train.feature_cache import (FeatureCacheConfig, FeatureCacheReader, build_feature_cache,
                                       check_cache_fits, load_cache_manifest, read_cache_errors)
from mar3d.weights import content_id, save_model_dir

pytestmark = pytest.mark.e2e

SIZES = (1024, 256, 64)
UNIT_STATS = {level: {"shift": 0.0, "std_mean": 1.0, "std_sample": 1.0} for level in ("lr", "hr")}


def _save_vae(folder: Path, seed: int, **changes) -> Path:
    """A random tiny VAE model folder (with latent statistics, as a trained one has)."""
    torch.manual_seed(seed)
    cfg = load_config(VAEConfig, "vae_tiny", [f"{k}={v}" for k, v in changes.items()])
    save_model_dir(folder, ShapeVAE(cfg).state_dict(), to_dict(cfg), kind="vae",
                   extra={"latent_stats": UNIT_STATS, "surface_sizes": list(SIZES)})
    return folder


@pytest.fixture(scope="module")
def frozen(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("frozen")
    cond_cfg = load_config(ConditionConfig, "mar_tiny", SMALL_CONDITION, section="condition")
    conditioner_id = save_conditioner(ImageEncoder(cond_cfg), root / "cond")
    return {"vae": _save_vae(root / "vae", 0), "other_vae": _save_vae(root / "other_vae", 1),
            "cond": root / "cond", "conditioner_id": conditioner_id}


@pytest.fixture(scope="module")
def cache(ycb_small_shards, frozen, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "cache"
    result = build_feature_cache(ycb_small_shards, out, str(frozen["cond"]), str(frozen["vae"]),
                                 FeatureCacheConfig(surface_sizes=SIZES, num_subsets=3), progress=False)
    assert result.rows == 4 and result.errors == 0 and not result.reused
    return out


def test_manifest_records_what_the_cache_was_made_from(cache, ycb_small_shards, frozen):
    from mar3d.evaluate import dataset_fingerprint
    from mar3d.inference import load_vae

    manifest = load_cache_manifest(cache)
    vae, _ = load_vae(frozen["vae"])
    assert manifest["conditioner_id"] == frozen["conditioner_id"]
    assert manifest["vae_id"] == content_id(vae.state_dict())
    assert manifest["dataset_hash"] == dataset_fingerprint(ycb_small_shards)["hash"]
    assert manifest["surface_sizes"] == list(SIZES) and manifest["num_subsets"] == 3
    assert manifest["counts"] == {"rows": 4, "errors": 0, "shards": 1}
    # tiny encoders at 64 px: CLIP 1 + 4x4 tokens, DINOv2 1 + 4x4; 2 stored views
    assert manifest["shapes"]["clip"] == [2, 17, 64] and manifest["shapes"]["dino"] == [2, 17, 64]
    assert manifest["shapes"]["lr_mean"] == [3, 64, 16] and manifest["shapes"]["hr_logvar"] == [3, 128, 16]
    assert read_cache_errors(cache) == []
    # A second build into the same folder from the same inputs reuses it; other inputs are refused.
    again = build_feature_cache(ycb_small_shards, cache, str(frozen["cond"]), str(frozen["vae"]),
                                FeatureCacheConfig(surface_sizes=SIZES, num_subsets=3), progress=False)
    assert again.reused and again.rows == 4
    with pytest.raises(ValueError, match="num_subsets: 3 != 4"):
        build_feature_cache(ycb_small_shards, cache, str(frozen["cond"]), str(frozen["vae"]),
                            FeatureCacheConfig(surface_sizes=SIZES), progress=False)


def test_objects_that_fail_are_error_rows(ycb_small_shards, frozen, tmp_path):
    """A VAE that cannot encode these shapes (FPS queries need 2048 of 1024 points): every
    object is an error row with its uid and the reason; none is silently missing, and
    training refuses a cache that lacks objects of its split."""
    vae = _save_vae(tmp_path / "bad_vae", 0, hr_tokens=2048)
    out = tmp_path / "cache"
    result = build_feature_cache(ycb_small_shards, out, str(frozen["cond"]), str(vae),
                                 FeatureCacheConfig(surface_sizes=SIZES, num_subsets=1), progress=False)
    errors = read_cache_errors(out)
    uids = ShapeDataset(ycb_small_shards, num_occ=1, with_occupancy=False).uids
    assert result.rows == 0 and result.errors == 4
    assert sorted(e["uid"] for e in errors) == sorted(uids)
    assert all(e["reason"] == "encode_failed" and "2048" in e["message"] for e in errors)
    assert load_cache_manifest(out)["error_reasons"] == {"encode_failed": 4}
    with pytest.raises(ValueError, match="lacks 4 of the 4 'all' objects"):
        FeatureCacheReader(out, ycb_small_shards, "all", ("lr",))


def _mar_stage(frozen, stage: str, target: str):
    from mar3d.train.stages import MARStage

    cfg = load_train_config(stage, f"train_{stage}_tiny", [
        f"vae_model_uri={frozen['vae']}", f"condition_model_uri={frozen['cond']}",
        f"latent_target={target}", *[f"condition.{o}" for o in SMALL_CONDITION]])
    mar = MARStage(cfg, stage)
    mar.setup(torch.device("cpu"), None)
    return mar


def _cached_batch(reader: FeatureCacheReader, rows: list[int], seed: int = 0) -> dict:
    from mar3d.train.data import collate

    rng = np.random.default_rng(seed)
    return collate([{k: torch.from_numpy(v) for k, v in reader.sample(i, rng).items()} for i in rows])


def test_cached_sample_equals_the_uncached_computation(cache, ycb_small_shards, frozen):
    """Per cached object and subset: the posterior mean is what the frozen VAE encodes
    (MARStage's latent_target=mean) for the point subset training draws at that epoch,
    and the features are the encoder's of each stored view, up to float16 rounding."""
    from mar3d.models.vae import surfaces_from_batch

    stage = _mar_stage(frozen, "hr", "mean")
    reader = FeatureCacheReader(cache, ycb_small_shards, "all", ("lr", "hr"))
    training = ShapeDataset(ycb_small_shards, surface_sizes=SIZES, rotate=False, seed=0,
                            num_occ=1, with_occupancy=False, split="all")
    for i in range(len(reader)):
        row = reader.read_row(i)
        stored = training.read_row(i)
        features = stage.encoder(stored["images"])
        for key in ("clip", "dino"):
            assert row[key].dtype == np.float16
            torch.testing.assert_close(torch.from_numpy(np.array(row[key])).float(), features[key],
                                       rtol=1e-3, atol=2e-3)
        for subset in range(3):
            training.set_epoch(subset)
            batch = {k: torch.from_numpy(v)[None] for k, v in training.sample(i).items()
                     if k.startswith("surface_")}
            lr, hr = stage.vae_latents(batch)
            torch.testing.assert_close(torch.from_numpy(row["lr_mean"][subset])[None], lr, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(torch.from_numpy(row["hr_mean"][subset])[None], hr, rtol=1e-5, atol=1e-5)
            assert surfaces_from_batch(batch, 3)[0].shape == (1, SIZES[0], 6)


def test_stage_draws_fresh_posterior_samples_from_the_cache(cache, ycb_small_shards, frozen):
    """latent_target=sample: z = mean + std * eps with fresh eps per step; the features
    go to the model as cached (no encoder run). float16 features move the training loss
    by far less than one step of training does."""
    stage = _mar_stage(frozen, "lr", "sample")
    reader = FeatureCacheReader(cache, ycb_small_shards, "all", ("lr",))
    batch = _cached_batch(reader, [0, 1, 2, 3])
    assert set(batch) == {"clip", "dino", "lr_mean", "lr_logvar"}
    first, _ = stage.vae_latents(batch)
    second, _ = stage.vae_latents(batch)
    std = torch.exp(0.5 * batch["lr_logvar"])
    eps = (first - batch["lr_mean"]) / std
    assert not torch.equal(first, second)
    assert abs(float(eps.mean())) < 0.05 and abs(float(eps.std()) - 1.0) < 0.05
    assert stage.features(batch)["clip"] is batch["clip"]

    # The rounding's cost: the loss on view 0 of every object with the cached float16
    # features vs. the encoder's float32 ones (same model, tokens and noise). A fresh MAR's
    # zero-initialised output layers make its loss ignore the condition, so the weights
    # are perturbed first (then zero features do move the loss).
    model = stage.build_model().eval()
    rows = [reader.read_row(i) for i in range(len(reader))]
    images = ShapeDataset(ycb_small_shards, num_occ=1, with_occupancy=False, split="all")
    cached = {k: torch.from_numpy(np.stack([r[k][0] for r in rows])) for k in ("clip", "dino")}
    exact = stage.encoder(np.stack([images.read_row(i)["images"][0] for i in range(len(reader))]))
    zeros = {k: torch.zeros_like(v) for k, v in exact.items()}
    tokens = model.mar.normalize(torch.from_numpy(np.stack([r["lr_mean"][0] for r in rows])))
    losses = []
    with torch.no_grad():
        torch.manual_seed(1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for features in (cached, exact, zeros):
            torch.manual_seed(3)
            losses.append(float(model(features, tokens, None)["loss"]))
    print(f"training loss with float16 features {losses[0]:.7f}, float32 {losses[1]:.7f}, zeros {losses[2]:.7f}")
    assert abs(losses[2] - losses[1]) > 1e-3  # the loss does depend on the features
    assert abs(losses[0] - losses[1]) < 1e-5 * losses[1]


def _other_dataset(data: Path, tmp_path: Path) -> Path:
    """The same rows under another content hash (one shard's recorded sha256 changed)."""
    other = tmp_path / "other_data"
    shutil.copytree(data, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    return other


def test_a_cache_of_other_inputs_is_refused(cache, ycb_small_shards, frozen, tmp_path):
    from mar3d.inference import load_vae

    fits = {"conditioner_id": frozen["conditioner_id"], "data": ycb_small_shards, "surface_sizes": SIZES,
            "vae_id": content_id(load_vae(frozen["vae"])[0].state_dict())}
    assert check_cache_fits(cache, **fits)["counts"]["rows"] == 4
    other_vae = content_id(load_vae(frozen["other_vae"])[0].state_dict())
    for change, message in [({"conditioner_id": "0" * 32}, "this run uses conditioner 0000"),
                            ({"vae_id": other_vae}, f"this run's frozen VAE is {other_vae}"),
                            ({"data": _other_dataset(ycb_small_shards, tmp_path)}, "made from dataset content"),
                            ({"surface_sizes": (2048, 512, 128)}, r"this run trains on \(2048, 512, 128\)")]:
        with pytest.raises(ValueError, match=message):
            check_cache_fits(cache, **{**fits, **change})


def test_pipeline_trains_mar_lr_and_hr_from_the_cache_lr_builds(cluster_pipeline, frozen, mlflow_server,
                                                                tmp_path):
    """The session's pipeline run (`--feature-cache`, tests/_pipeline_run.py): MAR-LR's
    driver built the cache into its run folder (after the conditioner) and the workers
    trained from it; MAR-HR trained from the same cache. A run whose VAE differs from the
    cache's is refused in the driver, before Ray Train starts."""
    from mlflow import MlflowClient

    lr, hr = cluster_pipeline.stages["lr"], cluster_pipeline.stages["hr"]
    assert lr.feature_cache == f"{lr.location}/feature_cache" and hr.feature_cache == lr.feature_cache
    manifest = load_cache_manifest(lr.feature_cache)
    vae_sizes = load_train_config("vae", "train_vae_tiny").surface_sizes
    assert manifest["counts"]["rows"] == 4 and manifest["surface_sizes"] == list(vae_sizes)
    client = MlflowClient(tracking_uri=mlflow_server)
    for result in (lr, hr):
        losses = [m.value for m in client.get_metric_history(result.run_id, "train/loss")]
        assert losses and all(np.isfinite(losses))
        assert client.get_metric_history(result.run_id, "train/latent_ms")
        assert client.get_metric_history(result.run_id, "eval/loss")  # evaluation: uncached path

    wrong = load_train_config("lr", "train_lr_tiny", [
        f"data={cluster_pipeline.data}", f"storage_path={tmp_path}", f"mlflow_uri={mlflow_server}",
        "experiment=test-feature-cache", "split=all", "num_workers=1", "cpus_per_worker=1",
        *[f"condition.{o}" for o in SMALL_CONDITION], f"vae_model_uri={frozen['other_vae']}",
        "run_name=lr-wrong-vae", f"condition_model_uri={lr.condition_model_uri}",
        f"feature_cache={lr.feature_cache}"])
    with pytest.raises(ValueError, match="this run's frozen VAE is"):
        run_training(wrong)
    run = client.search_runs([client.get_experiment_by_name("test-feature-cache").experiment_id],
                             "tags.mlflow.runName = 'lr-wrong-vae'")[0]
    assert run.info.status == "FAILED"
    assert not (tmp_path / "lr-wrong-vae" / "checkpoint_000000").exists()
