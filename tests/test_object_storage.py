"""Object storage (``s3://``) everywhere, against a real S3-API server on 127.0.0.1.

The server is moto in server mode (a subprocess speaking the S3 REST API); mar3d talks
to it exactly as to AWS or MinIO, through pyarrow's S3 filesystem and MLflow's boto3
artifact store, configured only by the standard AWS environment variables. boto3 is
used here only to create buckets and list what the jobs wrote.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from _faults import Background, logged_steps, processes, registered_step, wait_for
from _services import _free_port
from _ycb import YCB_SMALL

from mar3d import storage

BUCKET = "mar3d-test"
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
       "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A moto S3 server on a free local port for the whole session, stopped at the end."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=2).close()
            break
        except OSError:
            if time.time() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not answer within 60 s")
            time.sleep(0.3)
    yield endpoint
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


@pytest.fixture(scope="module", autouse=True)
def aws_env(s3_endpoint, tmp_path_factory):
    """The standard AWS variables pointing at the moto server, for this module only (and
    the local cache of remote runs in a temporary folder, not in ~/.cache)."""
    saved = {k: os.environ.get(k) for k in [*AWS, "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL",
                                            "MAR3D_CACHE_DIR"]}
    os.environ.update(AWS, AWS_ENDPOINT_URL=s3_endpoint,
                      MAR3D_CACHE_DIR=str(tmp_path_factory.mktemp("mar3d_cache")))
    os.environ.pop("MLFLOW_S3_ENDPOINT_URL", None)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def s3(aws_env, s3_endpoint):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=BUCKET)
    return client


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _upload(client, local: Path, prefix: str) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(local).as_posix()}")


# --------------------------------------------------------------------------- storage
def test_storage_roundtrip_and_listing(s3):
    base = f"s3://{BUCKET}/unit"
    storage.write_bytes(storage.join(base, "a", "x.bin"), b"abc")
    storage.write_bytes(storage.join(base, "b.txt"), b"hello")
    assert storage.list_files(base) == [f"{base}/a/x.bin", f"{base}/b.txt"]
    assert storage.list_files(base, recursive=False) == [f"{base}/b.txt"]
    assert storage.read_bytes(f"{base}/a/x.bin") == b"abc"
    assert storage.size(f"{base}/b.txt") == 5 and storage.size(f"{base}/nope") is None
    assert storage.is_dir(base) and storage.is_file(f"{base}/b.txt") and not storage.exists(f"{base}/zz")
    assert storage.name(f"{base}/a/x.bin") == "x.bin" and storage.parent(f"{base}/a/x.bin") == f"{base}/a"
    storage.delete(f"{base}/b.txt")
    # (pyarrow leaves an empty "unit/" marker so that the emptied folder still exists)
    assert [k for k in _keys(s3, "unit/") if not k.endswith("/")] == ["unit/a/x.bin"]


@pytest.mark.parametrize("uri, fragment", [
    ("ftp://x/data", "unsupported storage scheme 'ftp'"),
    ("s3://", "names no bucket"),
    ("s3:///prefix", "names no bucket"),
    ("s3://no-such-bucket-here/data", "bucket 'no-such-bucket-here'"),
])
def test_check_refuses_bad_locations(s3, uri, fragment):
    with pytest.raises(storage.StorageError, match=fragment):
        storage.check(uri, "dataset output")


def test_check_refuses_missing_credentials(s3, monkeypatch, tmp_path):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    with pytest.raises(storage.StorageError, match="no S3 credentials.*AWS_ACCESS_KEY_ID"):
        storage.check(f"s3://{BUCKET}/data", "dataset output")


def test_check_input_must_exist(s3):
    with pytest.raises(storage.StorageError, match="does not exist"):
        storage.check(f"s3://{BUCKET}/never-written", "mesh input", must_exist=True)


def test_mlflow_endpoint_follows_aws_endpoint(s3, s3_endpoint, monkeypatch):
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)
    storage.configure_mlflow_s3()
    assert os.environ["MLFLOW_S3_ENDPOINT_URL"] == s3_endpoint
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://elsewhere:1")
    storage.configure_mlflow_s3()  # an explicit MLflow setting wins
    assert os.environ["MLFLOW_S3_ENDPOINT_URL"] == "http://elsewhere:1"


# --------------------------------------------------------------------------- prepare
@pytest.fixture(scope="module")
def s3_shards(s3, ycb_small_dir, ray_local):
    """The YCB_SMALL objects (OBJ + MTL + texture) uploaded to S3 and prepared from there
    into S3 shards with the test data config."""
    from _shards import small_data_config

    from mar3d.data.prepare import prepare_dataset

    for name in YCB_SMALL:
        _upload(s3, (ycb_small_dir / name).resolve(), f"meshes/{name}")
    output = f"s3://{BUCKET}/data"
    result = prepare_dataset(f"s3://{BUCKET}/meshes", output, small_data_config(), progress=False)
    return output, result


@pytest.mark.e2e
def test_prepare_from_s3_to_s3(s3, s3_shards, ycb_small_shards):
    from _shards import small_data_config

    from mar3d.data.dataset import ShapeDataset
    from mar3d.data.prepare import complete_shards, load_manifest, prepare_dataset

    output, result = s3_shards
    # Every input is a row, as for local folders.
    assert (result.inputs, result.processed, result.failed, result.total_rows) == (4, 4, 0, 4)
    keys = _keys(s3, "data/")
    assert "data/manifest.json" in keys and "data/errors.parquet" in keys
    assert not [k for k in keys if k.endswith(".tmp")]
    manifest = load_manifest(output)
    assert [s["file"] for s in complete_shards(output, manifest, verify=True)] == \
        [s["file"] for s in manifest["shards"]] and len(manifest["shards"]) == 2

    remote, local = ShapeDataset(output, num_occ=1024), ShapeDataset(ycb_small_shards, num_occ=1024)
    assert sorted(remote.uids) == sorted(local.uids)  # same content hashes and names
    sources = {remote.read_row(i)["uid"]: i for i in range(len(remote))}
    for j, uid in enumerate(local.uids):
        # Same renders pixel for pixel: the materials and textures came along with the OBJ.
        assert np.array_equal(remote.read_row(sources[uid])["images"], local.read_row(j)["images"])
    sample = remote[0]
    assert sample["surface_0"].shape[1] == 6 and sample["occ_points"].shape[1] == 3

    again = prepare_dataset(f"s3://{BUCKET}/meshes", output, small_data_config(), progress=False)
    assert (again.processed, again.skipped, again.total_rows) == (0, 4, 4)


@pytest.mark.e2e
def test_prepare_refuses_bad_locations_before_ray(s3, tmp_path):
    from mar3d.data.prepare import prepare_dataset

    with pytest.raises(storage.StorageError, match="unsupported storage scheme"):
        prepare_dataset("ftp://host/meshes", tmp_path / "out")
    with pytest.raises(storage.StorageError, match="does not exist"):
        prepare_dataset(f"s3://{BUCKET}/no-meshes-here", tmp_path / "out")
    with pytest.raises(storage.StorageError, match="bucket 'absent-bucket'"):
        prepare_dataset(tmp_path, "s3://absent-bucket/data")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- train + MLflow
@pytest.fixture(scope="module")
def mlflow_s3(s3, tmp_path_factory):
    """A real `mlflow server` whose artifact store is the bucket: clients upload artifacts
    straight to S3 (--no-serve-artifacts), so mar3d's own MLflow client needs the
    endpoint, which it takes from AWS_ENDPOINT_URL (MLFLOW_S3_ENDPOINT_URL is unset)."""
    from _services import start_mlflow_server, stop_mlflow_server

    uri, proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow_s3"), artifact_args=[
        "--default-artifact-root", f"s3://{BUCKET}/mlflow", "--no-serve-artifacts"])
    yield uri
    stop_mlflow_server(proc)


def _train_cfg(data: str, mlflow_uri: str, steps: int):
    from mar3d.train import load_train_config

    return load_train_config("vae", "train_vae_tiny", [
        f"data={data}", f"storage_path=s3://{BUCKET}/train", f"mlflow_uri={mlflow_uri}",
        "run_name=vae-s3", "experiment=test-s3", "max_failures=0",
        # 4 objects, 2 workers x batch 2: all of them (split=all); a few steps are enough
        # for the mechanics (checkpoints and resume on S3), not for quality.
        "split=all", "batch_size=2", f"steps={steps}", "warmup_steps=2", "checkpoint_every=5",
        "eval_every=0", "num_eval_samples=2", "log_every=5", "latent_stats_shapes=4"])


@pytest.fixture(scope="module")
def trained_on_s3(s3_shards, mlflow_s3, ray_local):
    """A run on S3 storage killed mid-training (a worker SIGKILLed, no retries), then the
    same command again, which continues from the last checkpoint Ray Train registered in
    S3. Returns (the config, the first run's error, the registered step, the result)."""
    import signal

    from mar3d.train import run_training

    data, _ = s3_shards
    # A report waits for the controller's next poll: when the checkpoint of step 5 is seen
    # registered, training is at most a few log points (of 5 steps) further, far from 30.
    cfg = _train_cfg(data, mlflow_s3, steps=30)
    run = f"s3://{BUCKET}/train/{cfg.run_name}"
    job = Background(lambda: run_training(cfg))
    registered = wait_for(lambda: job.running() and registered_step(run), 400, "a checkpoint registered in S3")
    victims = processes("RayTrainWorker")
    assert victims, "no Ray Train worker of this session found"
    max(victims, key=lambda p: p.pid).send_signal(signal.SIGKILL)
    job.join(300)
    return cfg, job.error, registered, run_training(cfg)


@pytest.mark.e2e
def test_interrupted_training_on_s3_resumes_from_its_s3_checkpoint(s3, trained_on_s3, mlflow_s3,
                                                                   reliability_report):
    """A Ray Train worker SIGKILLed mid-training loses nothing: the same command again
    continues from the last checkpoint registered in the bucket, every log point in MLflow."""
    from mlflow import MlflowClient

    from mar3d.weights import load_model_dir

    cfg, error, registered, result = trained_on_s3
    # The first run failed (max_failures=0) with the training error, nothing else.
    assert type(error).__name__ == "TrainingError", error
    assert result.metrics["step"] == cfg.steps and result.run_location == f"s3://{BUCKET}/train/vae-s3"
    client = MlflowClient(mlflow_s3)
    starts = sorted((m.step, m.value) for m in client.get_metric_history(result.run_id, "train/start_step"))
    assert starts[0] == (0, 0.0) and len(starts) == 2, starts
    resumed = int(starts[1][1])  # the second run resumed at a registered checkpoint, not at 0
    assert resumed >= registered and resumed % 5 == 0 and resumed < cfg.steps, (starts, registered)
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert result.checkpoint_path.startswith(f"{BUCKET}/train/vae-s3/checkpoint_")
    keys = _keys(s3, "train/vae-s3/")
    assert "train/vae-s3/mar3d_run.json" in keys
    assert any(k.startswith("train/vae-s3/checkpoint_") and k.endswith(".safetensors") for k in keys)
    assert any(k.startswith("train/vae-s3/model/") and k.endswith(".safetensors") for k in keys)
    state = json.loads(storage.read_bytes(f"s3://{BUCKET}/train/vae-s3/mar3d_run.json"))
    assert state["run_id"] == result.run_id
    load_model_dir(result.model_dir, kind="vae")  # the local copy is a loadable model folder
    log_points = list(range(cfg.log_every, cfg.steps + 1, cfg.log_every))
    assert logged_steps(client, result.run_id) == log_points
    reliability_report.add("faults", fault="SIGKILL a Ray Train worker mid-training (storage on S3, "
                           "no retries)", at=f"after checkpoint step {registered}",
                           outcome=f"run failed; the same command again resumed at checkpoint step "
                           f"{resumed} from S3, finished step {cfg.steps}",
                           lost=f"0 steps (all {len(log_points)} log points in MLflow)")


@pytest.mark.e2e
def test_mlflow_artifacts_land_in_the_bucket(s3, trained_on_s3):
    second = trained_on_s3[-1]
    keys = _keys(s3, "mlflow/")
    model_keys = [k for k in keys if f"/{second.run_id}/artifacts/model/" in k]
    assert any(k.endswith(".safetensors") for k in model_keys), keys[:20]
    assert any(k.endswith("MLmodel") for k in model_keys)
    # ... and resolve back through MLflow, as registry and inference read them.
    from mar3d.registry import resolve_model_dir
    from mar3d.weights import load_model_dir

    load_model_dir(resolve_model_dir(second.model_uri, second.tracking_uri), kind="vae")


@pytest.mark.e2e
def test_training_refuses_bad_storage_before_starting(s3, s3_shards, mlflow_s3):
    from mar3d.train import run_training

    data, _ = s3_shards
    for storage_path, fragment in [("ftp://host/train", "unsupported storage scheme"),
                                   ("s3://", "names no bucket"),
                                   ("s3://absent-bucket/train", "bucket 'absent-bucket'")]:
        cfg = _train_cfg(data, mlflow_s3, steps=10)
        cfg.storage_path = storage_path
        with pytest.raises(storage.StorageError, match=fragment):
            run_training(cfg)
    cfg = _train_cfg(f"s3://{BUCKET}/no-data-here", mlflow_s3, steps=10)
    with pytest.raises(storage.StorageError, match="training data .* does not exist"):
        run_training(cfg)


# -------------------------------------------------------------------------- generate
@pytest.mark.e2e
def test_generate_to_s3(s3, mlflow_s3, ray_local, tmp_path):
    import trimesh
    from _tiny_release import write_tiny_release
    from PIL import Image

    from mar3d.generate import (
        GenerateConfig,
        batch_generate,
        mesh_paths,
        read_results,
    )
    from mar3d.inference import PipelineConfig
    from mar3d.models.mar import SamplingConfig

    release = write_tiny_release(tmp_path / "release")
    images = tmp_path / "images"
    images.mkdir()
    names = ["a.png", "b.png", "c.png"]
    for seed, name in enumerate(names):
        rgb = np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(images / name)
    (images / "notes.txt").write_text("not an image")
    fast = SamplingConfig(num_inference_steps=4, diffusion_steps=5)
    cfg = GenerateConfig(pipeline=PipelineConfig(sampling=fast, resolution=32),
                         num_actors=2, cpus_per_actor=0.5, batch_size=2, formats=("glb", "ply"))
    output = f"s3://{BUCKET}/generated"

    result = batch_generate(str(images), str(release), output, cfg, tracking_uri=mlflow_s3, progress=False)
    assert (result.total, result.succeeded, result.failed) == (4, 3, 1)
    assert result.results_path == f"{output}/results.parquet"
    keys = _keys(s3, "generated/")
    rows = {r["id"]: r for r in read_results(output).to_pylist()}
    assert len(rows) == 4 and sum(r["status"] == "ok" for r in rows.values()) == 3
    for r in rows.values():
        if r["status"] != "ok":
            assert r["reason"] == "not_image"
            continue
        assert r["outputs"] == mesh_paths(r["id"], ("glb", "ply"))
        for rel in r["outputs"]:
            assert f"generated/{rel}" in keys
        data = storage.read_bytes(f"{output}/{r['outputs'][0]}")
        mesh = trimesh.load(__import__("io").BytesIO(data), file_type="glb", force="mesh")
        assert len(mesh.faces) == r["num_faces"] > 0
    assert {"generated/results.parquet", "generated/generate.json", "generated/contact_sheet.png",
            "generated/gallery.html"} <= set(keys)
    assert result.gallery == f"{output}/gallery.html"
    assert b'id="mar3d-shapes-' in storage.read_bytes(result.gallery)  # meshes read back from S3
    assert not [k for k in keys if ".tmp" in k]
    # The job's MLflow artifacts (contact sheet, gallery, settings) are objects in the bucket too.
    run_keys = [k for k in _keys(s3, "mlflow/") if f"/{result.run_id}/artifacts/" in k]
    assert {k.rsplit("/", 1)[1] for k in run_keys} == {"contact_sheet.png", "gallery.html", "generate.json"}

    again = batch_generate(str(images), str(release), output, cfg, tracking_uri=mlflow_s3, progress=False)
    assert (again.succeeded, again.failed, again.skipped) == (0, 0, 4)  # resumable on S3 too

    with pytest.raises(storage.StorageError, match="bucket 'absent-bucket'"):
        batch_generate(str(images), str(release), "s3://absent-bucket/out", cfg, progress=False)


# -------------------------------------------------------------------------- evaluate
@pytest.mark.e2e
def test_evaluate_s3_dataset_to_s3(s3, s3_shards, mlflow_s3, tmp_path):
    from _tiny_release import write_tiny_release

    from mar3d.evaluate import EvalConfig, evaluate
    from mar3d.inference import PipelineConfig
    from mar3d.models.mar import SamplingConfig
    from mar3d.registry import read_eval_report

    data, _ = s3_shards
    release = write_tiny_release(tmp_path / "release")
    fast = SamplingConfig(num_inference_steps=4, diffusion_steps=5)
    cfg = EvalConfig(pipeline=PipelineConfig(use_hr=False, sampling=fast, resolution=32),
                     num_points=2000, previews=1, with_iou=False, max_objects=2, device="cpu",
                     groups=("all_objects",))
    output = f"s3://{BUCKET}/eval"
    result = evaluate(str(release), data, output, cfg, tracking_uri=mlflow_s3, progress=False)
    assert result.metrics["all_objects/num_objects"] == 2
    assert result.report_path == f"{output}/report.json"
    assert result.contact_sheets == {"all_objects": f"{output}/contact_sheets/all_objects.png"}
    assert result.view_pages == {"all_objects": f"{output}/views/all_objects.html"}
    keys = set(_keys(s3, "eval/"))
    assert {"eval/report.json", "eval/per_object.csv", "eval/chamfer_all_objects.csv",
            "eval/contact_sheets/all_objects.png", "eval/views/all_objects.html"} <= keys
    assert any(k.startswith("eval/previews/") for k in keys)
    report = json.loads(storage.read_bytes(result.report_path))
    assert report["dataset"] == data and report["run_id"] == result.run_id
    assert read_eval_report(output) == read_eval_report(result.report_path)  # what promote reads
    run_keys = [k for k in _keys(s3, "mlflow/") if f"/{result.run_id}/artifacts/" in k]
    assert any(k.endswith("/report.json") for k in run_keys)

    with pytest.raises(storage.StorageError, match="unsupported storage scheme"):
        evaluate(str(release), data, "ftp://host/eval", cfg, tracking_uri=mlflow_s3, progress=False)


# ------------------------------------------------------------------------ entry points
def _cli(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mar3d", *argv], capture_output=True, text=True,
                          env=env or os.environ.copy(), timeout=300, check=False)


@pytest.mark.parametrize("argv, fragment", [
    (["data", "prepare", "--input", "ftp://host/meshes", "--output", "{tmp}/out"],
     "unsupported storage scheme 'ftp'"),
    (["data", "prepare", "--input", "{tmp}", "--output", "s3://"], "names no bucket"),
    (["data", "prepare", "--input", "{tmp}", "--output", "s3://absent-bucket/data"],
     "bucket 'absent-bucket'"),
    (["train", "vae", "--set", "data=s3://mar3d-test/no-data", "--set", "storage_path={tmp}/t"],
     "training data s3://mar3d-test/no-data does not exist"),
    (["generate", "--images", "{tmp}", "--model", "{tmp}", "--output", "ftp://x"],
     "unsupported storage scheme 'ftp'"),
    (["evaluate", "--model", "{tmp}", "--dataset", "{tmp}", "--output", "s3://absent-bucket/eval"],
     "bucket 'absent-bucket'"),
])
def test_cli_refuses_bad_locations_with_a_clear_error(s3, tmp_path, argv, fragment, capsys):
    # The command's own entry point in this process (a new Python per case cost ~6 s of
    # imports each); the exit status of a real process is checked just below.
    from mar3d.cli import main

    code = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert fragment in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "t").exists()


def test_cli_refuses_missing_credentials(s3, tmp_path):
    """As a process: `python -m mar3d` exits with status 2 and the reason."""
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "none")
    proc = _cli("data", "prepare", "--input", str(tmp_path), "--output", f"s3://{BUCKET}/data2", env=env)
    assert proc.returncode == 2 and "no S3 credentials" in proc.stderr, proc.stderr[-2000:]


def test_fetch_mesh_brings_sidecars_and_refuses_escaping_references(s3, tmp_path):
    from mar3d.data.errors import MeshError
    from mar3d.data.prepare import fetch_mesh

    base = f"s3://{BUCKET}/fetch"
    storage.write_bytes(f"{base}/ok/m.obj", b"mtllib m.mtl\nv 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    storage.write_bytes(f"{base}/ok/m.mtl", b"newmtl a\nmap_Kd tex/t.png\n")
    storage.write_bytes(f"{base}/ok/tex/t.png", b"png")
    storage.write_bytes(f"{base}/ok/unrelated.bin", b"x" * 100)
    local = fetch_mesh(f"{base}/ok/m.obj", tmp_path / "ok", max_file_bytes=1 << 20)
    assert sorted(p.relative_to(tmp_path / "ok").as_posix() for p in (tmp_path / "ok").rglob("*")
                  if p.is_file()) == ["m.mtl", "m.obj", "tex/t.png"] and local.name == "m.obj"

    storage.write_bytes(f"{base}/bad/m.obj", b"mtllib ../ok/m.mtl\nv 0 0 0\nf 1 1 1\n")
    with pytest.raises(MeshError, match="unsafe_reference"):
        fetch_mesh(f"{base}/bad/m.obj", tmp_path / "bad", max_file_bytes=1 << 20)
    assert sorted(p.name for p in (tmp_path / "bad").rglob("*")) == ["m.obj"]  # nothing fetched
    with pytest.raises(MeshError, match="file_too_large"):
        fetch_mesh(f"{base}/ok/unrelated.bin", tmp_path / "big", max_file_bytes=10)
