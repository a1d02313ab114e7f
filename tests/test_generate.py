"""Batch generation (mar3d.generate): input listing, ids and seeds, per-item failure
isolation, and the Ray Data job end to end on folders, Parquet files and shard datasets,
with a tiny randomly initialised release (fast settings: 4 AR steps, 5 diffusion steps,
32^3 extraction grid)."""
import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import trimesh
from PIL import Image

from mar3d.config import ConfigError, load_config, to_dict
from mar3d.generate import (DETERMINISTIC_REASONS, GALLERY, RESULTS, GenerateConfig, batch_generate,
                            item_seed, list_inputs, mesh_paths, read_results)
from mar3d.generate.actor import _GeneratorActor
from mar3d.inference import PipelineConfig
from mar3d.models.mar import SamplingConfig
from mar3d.storage import safe_name
from mar3d.weights import load_model_dir, save_model_dir

from _tiny_release import write_tiny_release

FAST = dict(sampling=SamplingConfig(num_inference_steps=4, diffusion_steps=5), resolution=32)


def _cfg(**kw) -> GenerateConfig:
    kw.setdefault("num_actors", 2)
    kw.setdefault("cpus_per_actor", 0.5)  # two actors fit on two busy cores
    kw.setdefault("batch_size", 2)
    cfg = GenerateConfig(pipeline=PipelineConfig(**FAST), **kw)
    cfg.validate()
    return cfg


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_tiny_release(tmp_path_factory.mktemp("release"))


def _rgb(seed: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


GOOD = ["a.png", "sub/b.png", "c.jpg", "odd name!.png"]
BAD = {  # file -> expected reason, and a fragment of its message
    "corrupt.png": ("invalid_image", "unreadable"),
    "tiny.png": ("invalid_image", "at least"),
    "deep.png": ("invalid_image", "mode"),
    "cmyk.jpg": ("invalid_image", "mode"),
    "anim.gif": ("invalid_image", "animated"),
    "notes.txt": ("not_image", "not an image file"),
    "sub/README": ("not_image", "not an image file"),
}


def _write_image_folder(root):
    (root / "sub").mkdir(parents=True)
    Image.fromarray(_rgb(0)).save(root / "a.png")
    rgba = np.concatenate([_rgb(1), np.full((64, 64, 1), 255, np.uint8)], axis=-1)
    Image.fromarray(rgba).save(root / "sub" / "b.png")
    Image.fromarray(_rgb(2, 48)).save(root / "c.jpg")
    Image.fromarray(_rgb(3)).save(root / "odd name!.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    Image.new("RGB", (1, 1)).save(root / "tiny.png")
    Image.fromarray(np.full((64, 64), 40000, np.uint16)).save(root / "deep.png")
    Image.new("CMYK", (64, 64)).save(root / "cmyk.jpg")
    Image.new("RGB", (64, 64)).save(root / "anim.gif", save_all=True,
                                    append_images=[Image.new("RGB", (64, 64), "red")])
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / "README").write_text("no suffix")
    return root


@pytest.fixture
def image_folder(tmp_path):
    return _write_image_folder(tmp_path / "images")


def _gallery_panels(path) -> list[dict]:
    import json
    import re

    return json.loads(re.search(r'id="mar3d-data">(.*?)</script>', path.read_text(), re.S).group(1))["panels"]


# ----------------------------------------------------------------------- units (no Ray)
def test_safe_name():
    assert safe_name("sub/cat.png") == "sub__cat.png"
    assert safe_name("odd name!.png") == "odd_name_.png"
    assert safe_name(".hidden") == "_hidden"
    for bad in ["../evil", "/etc/passwd", "a/./b", "a//b", "", "..", "x/.."]:
        with pytest.raises(ValueError, match="path parts"):
            safe_name(bad)
    long_a, long_b = "x" * 300 + "a", "x" * 300 + "b"
    assert len(safe_name(long_a)) <= 160 and safe_name(long_a) != safe_name(long_b)


def test_item_seed_is_stable_and_spread():
    assert item_seed("a.png") == item_seed("a.png")
    assert item_seed("a.png", base_seed=5) == (item_seed("a.png") + 5) % 2 ** 32
    seeds = {item_seed(f"img{i}.png") for i in range(200)}
    assert len(seeds) == 200 and all(0 <= s < 2 ** 32 for s in seeds)


def test_config_validation_and_loading():
    cfg = load_config(GenerateConfig, overrides=["pipeline.resolution=64", "formats=[glb,ply]",
                                                 "num_actors=3", "gpus_per_actor=0.5"])
    assert cfg.pipeline.resolution == 64 and cfg.formats == ("glb", "ply") and cfg.gpus_per_actor == 0.5
    for bad, match in [({"formats": ("stl",)}, "formats"), ({"formats": ("glb", "glb")}, "formats"),
                       ({"num_actors": 0}, "num_actors"), ({"cpus_per_actor": 0}, "cpus_per_actor"),
                       ({"batch_size": 0}, "batch_size"), ({"max_items": 0}, "max_items"),
                       ({"base_seed": -1}, "base_seed")]:
        with pytest.raises(ValueError, match=match):
            GenerateConfig(**bad).validate()
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(GenerateConfig, overrides=["num_actor=2"])


def test_cli_shortcut_flags_set_the_generate_config():
    from mar3d.cli import build_parser, generate_config

    def config(*flags):
        return generate_config(build_parser().parse_args(
            ["generate", "--images", "in", "--output", "out", "--config", "generate_tiny", *flags]))

    assert config().pipeline.kv_top_k is None  # exact by default
    assert config("--kv-top-k", "64").pipeline.kv_select().top_k == 64
    # the flag wins over --set, which still sets the other two
    cfg = config("--set", "pipeline.kv_top_k=8", "--set", "pipeline.kv_block=256", "--kv-top-k", "32")
    assert (cfg.pipeline.kv_top_k, cfg.pipeline.kv_block, cfg.pipeline.resolution) == (32, 256, 64)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        config("--kv-top-k", "0")
    # sampling: None is the model's own; the flags win over --set
    assert config().pipeline.sampling.overrides() == {}
    cfg = config("--set", "pipeline.sampling.guidance_scale=2", "--num-inference-steps", "8",
                 "--guidance-scale", "1.5")
    assert cfg.pipeline.sampling.overrides() == {"num_inference_steps": 8, "guidance_scale": 1.5}
    with pytest.raises(ValueError, match="guidance_scale must be >= 1"):
        config("--guidance-scale", "0.5")


def test_list_folder_accounts_for_every_file(image_folder):
    out_inside = image_folder / "out"  # an output folder inside the input is not input
    (out_inside / "meshes").mkdir(parents=True)
    (out_inside / "meshes" / "a.png.glb").write_bytes(b"x")
    items = list_inputs(image_folder, _cfg(), exclude=out_inside)
    by_input = {it["raw_id"]: it for it in items}
    assert set(by_input) == set(GOOD) | set(BAD)
    assert [it["id"] for it in items] == sorted(it["id"] for it in items)
    assert by_input["notes.txt"]["kind"] == by_input["sub/README"]["kind"] == "not_image"
    assert by_input["sub/b.png"]["id"] == "sub__b.png" and by_input["sub/b.png"]["kind"] == "file"
    assert all(it["seed"] == item_seed(it["id"]) for it in items)
    assert len(list_inputs(image_folder, _cfg(max_items=3), exclude=out_inside)) == 3


def test_list_parquet_needs_image_column(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "pixels": [b"x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="'image' column"):
        list_inputs(tmp_path / "bad.parquet", _cfg())
    with pytest.raises(FileNotFoundError):
        list_inputs(tmp_path / "missing", _cfg())


def test_empty_field_is_an_error_row_not_a_crash(tmp_path):
    """A model whose decoder says "outside" everywhere: marching cubes finds no surface."""
    release = write_tiny_release(tmp_path / "release")
    state, doc = load_model_dir(release / "vae", kind="vae")
    state["decoder.head.weight"].zero_()
    state["decoder.head.bias"].fill_(-10.0)
    save_model_dir(release / "vae", state, doc["model"], kind="vae")
    Image.fromarray(_rgb(0)).save(tmp_path / "a.png")
    (tmp_path / "out").mkdir()
    actor = _GeneratorActor(str(release), to_dict(PipelineConfig(**FAST)), str(tmp_path / "out"),
                            ["glb"], None, use_gpu=False, num_cpus=1)
    items = [{"id": "a.png", "kind": "file", "source": str(tmp_path / "a.png"), "row": -1, "view": -1,
              "column": "", "input": "a.png", "fingerprint": "f", "seed": 1},
             {"id": "gone.png", "kind": "file", "source": str(tmp_path / "gone.png"), "row": -1,
              "view": -1, "column": "", "input": "gone.png", "fingerprint": "missing", "seed": 2}]
    rows = actor(pa.Table.from_pylist(items)).to_pylist()
    assert [r["status"] for r in rows] == ["error", "error"]
    assert rows[0]["reason"] == "no_surface" and "no surface" in rows[0]["error"]
    assert rows[0]["sample_seconds"] > 0 and rows[0]["outputs"] == []
    assert rows[1]["reason"] == "missing_image" and "does not exist" in rows[1]["error"]
    assert not list((tmp_path / "out").iterdir())


def _file_item(folder, name: str, seed: int) -> dict:
    return {"id": name, "kind": "file", "source": str(folder / name), "row": -1, "view": -1, "column": "",
            "input": name, "fingerprint": name, "seed": seed}


def test_actor_samples_its_batch_together_and_keeps_errors_per_item(release, tmp_path):
    """One model call for the batch's readable images; a corrupt image is its own error row,
    and each mesh is the one its image and seed give alone (batch invariance)."""
    from mar3d.inference import MAR3DPipeline

    Image.fromarray(_rgb(0)).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    Image.fromarray(_rgb(2, size=80)).save(tmp_path / "c.png")
    out = tmp_path / "out"
    actor = _GeneratorActor(str(release), to_dict(PipelineConfig(**FAST)), str(out), ["ply"], None,
                            use_gpu=False, num_cpus=1)
    items = [_file_item(tmp_path, "a.png", 11), _file_item(tmp_path, "bad.png", 12), _file_item(tmp_path, "c.png", 13)]
    rows = actor(pa.Table.from_pylist(items)).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "error", "ok"]
    assert rows[1]["reason"] == "invalid_image" and "unreadable" in rows[1]["error"]
    pipe = MAR3DPipeline.from_pretrained(str(release), config=PipelineConfig(**FAST), device="cpu")
    for row, item in zip(rows[::2], items[::2]):
        alone = pipe(item["source"], seed=item["seed"]).meshes[0]
        written = trimesh.load(out / row["outputs"][0], process=False)
        assert row["num_vertices"] == len(alone.vertices) == len(written.vertices)
        np.testing.assert_allclose(np.sort(written.vertices, axis=0), np.sort(alone.vertices, axis=0), atol=1e-5)
        assert row["sample_seconds"] > 0 and row["seconds"] >= row["sample_seconds"] + row["decode_seconds"]


# --------------------------------------------------------------------------- Ray jobs
@pytest.mark.e2e
def test_folder_job_rerun_and_seed_stability(ray_local, release, image_folder, tmp_path):
    out = tmp_path / "out"
    cfg = _cfg(formats=("glb", "ply"))
    result = batch_generate(str(image_folder), str(release), str(out), cfg, progress=False)
    total = len(GOOD) + len(BAD)
    assert (result.total, result.succeeded, result.failed, result.skipped) == (total, len(GOOD), len(BAD), 0)
    assert result.reasons == {"invalid_image": 5, "not_image": 2}
    assert result.to_dict()["results_path"] == str(out / RESULTS) and "meshes" in result.summary()

    rows = {r["input"].removeprefix(str(image_folder.absolute()) + "/"): r
            for r in read_results(out).to_pylist()}
    assert set(rows) == set(GOOD) | set(BAD)  # exactly one row per input file
    for name in GOOD:
        r = rows[name]
        assert r["status"] == "ok" and r["reason"] is None and r["level"] == "hr"
        assert r["outputs"] == mesh_paths(r["id"], ("glb", "ply"))
        assert r["seed"] == item_seed(r["id"]) and r["seconds"] > 0 and r["worker"] != "driver"
        for rel in r["outputs"]:
            mesh = trimesh.load(out / rel, force="mesh")
            assert len(mesh.faces) == r["num_faces"] > 0
    for name, (reason, fragment) in BAD.items():
        r = rows[name]
        assert r["status"] == "error" and r["reason"] == reason and fragment in r["error"], r
        assert r["reason"] in DETERMINISTIC_REASONS and r["outputs"] == []
    assert not list(out.rglob("*.tmp*"))
    # The gallery shows every result: the meshes with their input images, the errors with
    # their reasons (the page's own data, as its script reads it).
    assert result.gallery == out / GALLERY
    panels = {p["title"]: p for p in _gallery_panels(out / GALLERY)}
    assert set(panels) == {r["id"] for r in rows.values()}
    for name, r in rows.items():
        panel = panels[r["id"]]
        if name in GOOD:
            assert panel["image"] and [s["label"] for s in panel["shapes"]] == ["generated"], panel
            assert panel["shapes"][0]["source_count"] == r["num_faces"] and not panel["error"]
        else:
            assert panel["error"] == f"{r['reason']}: {r['error']}" and not panel["shapes"]

    # A re-run has nothing to do: finished meshes and deterministic errors are skipped;
    # the half-written file of a writer killed in an earlier run is removed.
    leftover = out / "meshes" / "cup.png.glb.4242.tmp.glb"
    leftover.write_bytes(b"glTF partial")
    again = batch_generate(str(image_folder), str(release), str(out), cfg, progress=False)
    assert (again.succeeded, again.failed, again.skipped) == (0, 0, total)
    assert not leftover.exists()

    # A lost mesh file is regenerated, with the same seed and the same mesh; a bad input
    # that was fixed (new size/mtime) is tried again.
    (out / rows["a.png"]["outputs"][1]).unlink()
    Image.fromarray(_rgb(9)).save(image_folder / "corrupt.png")
    redo = batch_generate(str(image_folder), str(release), str(out), cfg, progress=False)
    assert (redo.succeeded, redo.failed, redo.skipped) == (2, 0, total - 2)
    latest = {r["id"]: r for r in read_results(out).to_pylist()}
    assert latest["corrupt.png"]["status"] == "ok" and len(latest) == total
    new = latest["a.png"]
    assert new["seed"] == rows["a.png"]["seed"] and new["num_faces"] == rows["a.png"]["num_faces"]
    assert new["finished_at"] >= rows["a.png"]["finished_at"]

    # One output folder, one model and one set of settings.
    with pytest.raises(ValueError, match="other settings"):
        batch_generate(str(image_folder), str(release), str(out), _cfg(base_seed=1), progress=False)


@pytest.mark.e2e
def test_parquet_folder_job(ray_local, release, tmp_path):
    data = tmp_path / "parquet"
    data.mkdir()
    pq.write_table(pa.table({
        "id": ["x", "../evil", "x", "nobytes", "garbage", "y"],
        "image": [_png_bytes(_rgb(0)), _png_bytes(_rgb(1)), _png_bytes(_rgb(2)), None, b"garbage",
                  _png_bytes(_rgb(3))]}), data / "a.parquet", row_group_size=2)
    hf_struct = pa.array([{"bytes": _png_bytes(_rgb(4)), "path": "p.png"}],
                         pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": hf_struct}), data / "b.parquet")
    result = batch_generate(str(data), str(release), str(tmp_path / "out"), _cfg(num_actors=1),
                            progress=False)
    assert (result.total, result.succeeded, result.failed) == (7, 3, 4)
    rows = {r["input"].rsplit("/", 1)[1]: r for r in read_results(tmp_path / "out").to_pylist()}
    assert len(rows) == 7
    assert rows["a.parquet#row=0"]["id"] == "x" and rows["a.parquet#row=0"]["status"] == "ok"
    assert rows["a.parquet#row=5"]["status"] == "ok" and rows["b.parquet#row=0"]["id"] == "b-000000"
    assert rows["b.parquet#row=0"]["status"] == "ok"
    assert rows["a.parquet#row=1"]["reason"] == "unsafe_id"
    assert rows["a.parquet#row=2"]["reason"] == "duplicate_id"
    assert rows["a.parquet#row=3"]["reason"] == "invalid_image" and "no image bytes" in rows["a.parquet#row=3"]["error"]
    assert rows["a.parquet#row=4"]["reason"] == "invalid_image"
    assert (tmp_path / "out" / "meshes" / "x.glb").is_file()
    # The gallery reads each row's image back from its Parquet row (plain bytes and the
    # Hugging Face struct alike).
    panels = _gallery_panels(result.gallery)
    assert len(panels) == 7 and sum(bool(p["shapes"]) for p in panels) == 3
    assert all(p["image"] for p in panels if p["shapes"])


@pytest.fixture(scope="module")
def shard_dataset(tmp_path_factory, ray_local, ycb_root):
    from _shards import make_small_shards

    src = tmp_path_factory.mktemp("one_mesh")
    os.symlink(ycb_root / "077_rubiks_cube", src / "077_rubiks_cube")
    return make_small_shards(src, tmp_path_factory.mktemp("shards") / "data")


@pytest.mark.e2e
def test_shard_dataset_job(ray_local, release, shard_dataset, tmp_path):
    with pytest.raises(ValueError, match="view_index 5"):
        batch_generate(str(shard_dataset), str(release), str(tmp_path / "o1"), _cfg(view_index=5))
    result = batch_generate(str(shard_dataset), str(release), str(tmp_path / "out"),
                            _cfg(all_views=True), progress=False)
    assert (result.total, result.succeeded, result.failed) == (2, 2, 0)  # 2 stored views
    rows = read_results(tmp_path / "out").to_pylist()
    assert sorted(r["id"][-3:] for r in rows) == ["_v0", "_v1"]
    assert all("#uid=" in r["input"] and (tmp_path / "out" / r["outputs"][0]).is_file() for r in rows)
    # Dataset inputs know their ground truth: input | generated x2 | ground truth x2 per row.
    sheet = Image.open(result.contact_sheet)
    assert result.contact_sheet == tmp_path / "out" / "contact_sheet.png"
    assert sheet.size[0] >= 2 * 5 * 128  # 2 rows side by side (3 columns max), 5 panels each
    from mar3d import tracking

    # No tracking URI given: the job's default (MLFLOW_TRACKING_URI, else beside its output).
    client = tracking.client(tracking.default_tracking_uri(tmp_path / "out"))
    run = client.get_run(result.run_id)
    assert run.data.metrics["succeeded"] == 2 and run.data.tags["mar3d.kind"] == "generate"
    assert {f.path for f in client.list_artifacts(result.run_id)} >= {"contact_sheet.png", "generate.json",
                                                                      "gallery.html"}
    # The gallery in a real browser: each panel's generated mesh and ground truth draw
    # and turn together; `mar3d view` on the output writes the same page.
    from _browser import check_view_turns, chromium_page, page_frame

    with chromium_page() as page:
        page.goto(result.gallery.as_uri())
        assert check_view_turns(page, page_frame(page), "gallery.png")["views_in_panel"] == 2
    from mar3d.cli import main

    assert main(["view", str(tmp_path / "out"), "-o", str(tmp_path / "again.html"), "--no-progress"]) == 0
    assert _gallery_panels(tmp_path / "again.html") == _gallery_panels(result.gallery)


@pytest.mark.e2e
def test_registry_alias_is_pinned_to_a_version(ray_local, release, mlflow_server, tmp_path):
    """`--model models:/NAME@ALIAS`: the driver pins the alias's version once; actors load it."""
    import mlflow

    from mar3d.registry import RegistryConfig, register_release

    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment("test-generate")
    uris = {}
    for comp in ("vae", "cond", "lr", "hr"):
        with mlflow.start_run(run_name=f"tiny-{comp}") as run:
            mlflow.log_artifacts(str(release / comp), "model")
        uris[comp] = f"runs:/{run.info.run_id}/model"
    rel = register_release(uris, cfg=RegistryConfig(name="mar3d-gen-test"), alias="champion",
                           tracking_uri=mlflow_server)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(_rgb(i)).save(images / f"im{i}.png")
    result = batch_generate(str(images), "models:/mar3d-gen-test@champion", str(tmp_path / "out"),
                            _cfg(num_actors=1), tracking_uri=mlflow_server, progress=False)
    assert result.model == f"models:/mar3d-gen-test/{rel.version}"
    assert (result.succeeded, result.failed) == (2, 0)
    # Plain images have no stored camera or ground truth: input | generated x2 per row.
    from mlflow import MlflowClient

    assert Image.open(result.contact_sheet).size[0] == 2 * 3 * 128
    client = MlflowClient(tracking_uri=mlflow_server)
    assert "contact_sheet.png" in {f.path for f in client.list_artifacts(result.run_id)}
    assert client.get_run(result.run_id).data.params["model"] == result.model
    rows = read_results(tmp_path / "out").to_pylist()
    assert {r["model"] for r in rows} == {result.model}


@pytest.mark.e2e
def test_actor_pool_fits_the_cluster(ray_local):
    from mar3d.generate.job import _fit_actors

    cpus = ray_local.cluster_resources()["CPU"]
    assert _fit_actors(int(cpus) + 3, 1.0, 0.0) == int(cpus)  # capped, with a warning
    assert _fit_actors(2, 0.5, 0.0) == 2
    with pytest.raises(ValueError, match="cannot hold one actor"):
        _fit_actors(1, cpus + 1, 0.0)
    if ray_local.cluster_resources().get("GPU", 0) == 0:
        with pytest.raises(ValueError, match="GPUs"):
            _fit_actors(1, 0.5, 1.0)
