"""`mar3d data synth`: the procedural corpus (Objaverse 1.0 layout), and the data job's
use of meshes that already bound a solid (no distance grid for them)."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import trimesh

from mar3d.cli import main
from mar3d.data import process_mesh
from mar3d.data.config import small_test_config
from mar3d.data.inside import embree_inside, winding_inside, winding_numbers
from mar3d.data.mesh_io import load_mesh
from mar3d.data.prepare import watertight_surface
from mar3d.data.synth import CATEGORIES, SynthConfig, make_object, object_uid, synthesize
from mar3d.data.watertight import closed_input
from mar3d.metrics import normal_consistency, sample_surface


def _read_gz(path: Path):
    return json.loads(gzip.decompress(path.read_bytes()))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    synthesize(root, SynthConfig(num_objects=2 * len(CATEGORIES), workers=1, texture_size=64), progress=False)
    return root


def test_corpus_is_in_the_objaverse_layout_with_categories(corpus):
    paths = _read_gz(corpus / "object-paths.json.gz")
    lvis = _read_gz(corpus / "lvis-annotations.json.gz")
    metadata = _read_gz(corpus / "metadata" / "000-000.json.gz")
    assert len(paths) == 2 * len(CATEGORIES)
    assert sorted(lvis) == sorted(CATEGORIES) and all(len(v) == 2 for v in lvis.values())
    assert sorted(u for uids in lvis.values() for u in uids) == sorted(paths)
    for uid, rel in paths.items():
        assert rel == f"glbs/000-000/{uid}.glb" and (corpus / rel).is_file()
        assert len(uid) == 32 and int(uid, 16) >= 0
        meta = metadata[uid]
        assert meta["uid"] == uid and meta["license"] == "CC0-1.0" and meta["name"]
        assert uid in lvis[meta["categories"][0]]
    assert not list(corpus.rglob("*.tmp"))


def test_every_category_is_a_textured_y_up_solid(corpus):
    """Watertight by construction (so the data job skips the grid), a PBR base-colour
    texture with UVs, and +Y up as glTF: lathe bodies stand along y."""
    metadata = _read_gz(corpus / "metadata" / "000-000.json.gz")
    seen = set()
    for uid, meta in sorted(metadata.items()):
        path = corpus / "glbs" / "000-000" / f"{uid}.glb"
        scene = trimesh.load(path, process=False)
        (part,) = scene.geometry.values()
        assert part.visual.uv is not None and len(part.visual.uv) == len(part.vertices)
        assert part.visual.material.baseColorTexture.size == (64, 64)
        mesh = load_mesh(path, 10**6, 10**8)
        assert closed_input(mesh.vertices, mesh.faces) is not None, meta["name"]
        category = meta["categories"][0]
        if CATEGORIES[category][0] == "lathe" and category not in ("bowl", "fruit"):
            extent = mesh.vertices.max(0) - mesh.vertices.min(0)
            assert extent.argmax() == 1, (category, extent)
        seen.add(category)
    assert seen == set(CATEGORIES)


def test_objects_are_deterministic_and_a_larger_corpus_keeps_them(corpus, tmp_path):
    cfg = SynthConfig(num_objects=2 * len(CATEGORIES), workers=1, texture_size=64)
    first, record = make_object(3, cfg, [])
    again, _ = make_object(3, cfg, [])
    assert first == again and record["uid"] == object_uid(0, 3)
    assert make_object(3, SynthConfig(seed=1, texture_size=64), [])[0] != first
    grown = SynthConfig(num_objects=2 * len(CATEGORIES) + 5, workers=2, texture_size=64)
    synthesize(tmp_path, grown, progress=False)
    old = _read_gz(corpus / "object-paths.json.gz")
    new = _read_gz(tmp_path / "object-paths.json.gz")
    assert set(old) < set(new) and len(new) == len(old) + 5
    for uid, rel in old.items():
        assert (tmp_path / rel).read_bytes() == (corpus / rel).read_bytes()


def test_config_and_command_line(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown synth categories \\['spoon'\\]"):
        SynthConfig(categories=("cup", "spoon")).validate()
    with pytest.raises(ValueError, match="photo_dir"):
        SynthConfig(photo_dir=str(tmp_path / "missing")).validate()
    photos = tmp_path / "photos"
    photos.mkdir()
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), np.uint8)).save(photos / "p.jpg")
    out = tmp_path / "corpus"
    assert main(["data", "synth", "--output", str(out), "--num", "4", "--categories", "cup,table",
                 "--photo-dir", str(photos), "--workers", "1", "--no-progress",
                 "--set", "texture_size=32", "--result-json", str(tmp_path / "r.json")]) == 0
    assert "synth: 4 objects in 2 categories" in capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["categories"] == {"cup": 2, "table": 2}
    with pytest.raises(SystemExit, match="unknown synth categories"):
        main(["data", "synth", "--output", str(out), "--categories", "spoon"])


# ------------------------------------------------------------- meshes that bound a solid
def _plus() -> trimesh.Trimesh:
    return trimesh.util.concatenate([trimesh.creation.box((2, 0.5, 0.5)), trimesh.creation.box((0.5, 2, 0.5))])


def _nested(invert_inner: bool) -> trimesh.Trimesh:
    inner = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    if invert_inner:
        inner.invert()
    return trimesh.util.concatenate([trimesh.creation.icosphere(subdivisions=2), inner])


def _inverted_box() -> trimesh.Trimesh:
    box = trimesh.creation.box()
    box.invert()
    return box


def _open_box() -> trimesh.Trimesh:
    box = trimesh.creation.box()
    return trimesh.Trimesh(box.vertices, box.faces[:-1])


def _leg_standing_on_a_top() -> trimesh.Trimesh:
    top = trimesh.creation.box(extents=(1, 1, 0.1)).apply_translation([0, 0, 0.55])
    return trimesh.util.concatenate([top, trimesh.creation.box(extents=(0.1, 0.1, 1.0))])


def _two_spheres() -> trimesh.Trimesh:
    far = trimesh.creation.icosphere(subdivisions=2).apply_translation([3, 0, 0])
    return trimesh.util.concatenate([trimesh.creation.icosphere(subdivisions=2), far])


@pytest.mark.parametrize("make, closed", [
    (trimesh.creation.box, True), (_inverted_box, True), (_two_spheres, True),
    (lambda: _nested(invert_inner=True), True),    # a cavity
    (lambda: _nested(invert_inner=False), False),  # a solid inside a solid: parity says outside
    (_plus, False),                                 # crossing parts: parity says their overlap is outside
    (_leg_standing_on_a_top, False),                # touching parts: two coincident walls inside
    (_open_box, False),
], ids=["box", "inverted box", "two spheres", "cavity", "nested solid", "crossing boxes", "touching parts",
        "open box"])
def test_closed_input_accepts_only_meshes_whose_parity_labels_are_right(make, closed):
    mesh = make()
    result = closed_input(mesh.vertices, mesh.faces)
    assert (result is not None) == closed
    if result is not None:
        points = np.random.default_rng(0).uniform(-1.5, 4, (4000, 3))
        solid = np.abs(winding_numbers(mesh, points)) > 0.5  # orientation-free truth
        assert result.volume > 0 and (embree_inside(result, points) == solid).all()


def test_a_closed_mesh_is_labelled_as_it_is_and_a_soup_still_goes_through_the_grid(corpus):
    cfg = small_test_config()
    rel = sorted(_read_gz(corpus / "object-paths.json.gz").values())[0]
    mesh = load_mesh(corpus / rel, cfg.max_faces, cfg.max_file_bytes)
    surface, shaded, method = watertight_surface(mesh, cfg)
    assert method == "snap" and len(surface.faces) == len(mesh.faces)  # the input itself
    row = process_mesh(corpus / rel, cfg)
    exact = trimesh.Trimesh(mesh.vertices, mesh.faces)
    for kind in ("vol", "near"):
        truth = winding_inside(exact, row[f"{kind}_points"].astype(np.float64))
        assert (row[f"{kind}_labels"].astype(bool) == truth).mean() >= 0.999, kind
    # Sampled normals are the surface's own: flat faces keep theirs across sharp edges.
    points, normals = sample_surface(exact, 4096, seed=1)
    surface = row["surface_0"]
    assert normal_consistency(surface[:, :3], surface[:, 3:], points, normals) >= 0.95
    plus = load_mesh_from(_plus())
    surface, shaded, method = watertight_surface(plus, cfg)
    assert method == "snap" and len(surface.faces) != len(plus.faces)  # gridded
    cfg.watertight_reuse_closed = False
    assert len(watertight_surface(mesh, cfg)[0].faces) != len(mesh.faces)


def load_mesh_from(mesh: trimesh.Trimesh):
    from mar3d.data.mesh_io import LoadedMesh

    return LoadedMesh(parts=[mesh], vertices=np.asarray(mesh.vertices), faces=np.asarray(mesh.faces),
                      face_part=np.zeros(len(mesh.faces), np.int64), face_offset=np.zeros(1, np.int64),
                      transform=np.eye(4))


def test_ensure_corpus_makes_a_corpus_once_regrows_it_and_refuses_another(tmp_path):
    from mar3d.data.synth import RECORD_FILE, SYNTH_SOURCE, ensure_corpus

    cfg = SynthConfig(num_objects=3, categories=("cup", "box"), workers=1, texture_size=32)
    made = ensure_corpus(tmp_path / "c", cfg, progress=False)
    assert made is not None and made.num_objects == 3
    assert json.loads((tmp_path / "c" / RECORD_FILE).read_text())["config"]["num_objects"] == 3
    meta = _read_gz(tmp_path / "c" / "metadata" / "000-000.json.gz")
    assert {m["source"] for m in meta.values()} == {SYNTH_SOURCE}
    assert ensure_corpus(tmp_path / "c", cfg, progress=False) is None  # already there
    # A larger count regrows it in place; the objects it had stay the same files.
    before = sorted(p.read_bytes() for p in (tmp_path / "c" / "glbs").rglob("*.glb"))
    grown = ensure_corpus(tmp_path / "c", SynthConfig(num_objects=4, categories=("cup", "box"),
                                                      workers=1, texture_size=32), progress=False)
    assert grown.num_objects == 4 and len(_read_gz(tmp_path / "c" / "object-paths.json.gz")) == 4
    after = {p.read_bytes() for p in (tmp_path / "c" / "glbs").rglob("*.glb")}
    assert set(before) <= after
    with pytest.raises(ValueError, match="other settings"):
        ensure_corpus(tmp_path / "c", SynthConfig(num_objects=4, seed=1, categories=("cup", "box"),
                                                  workers=1, texture_size=32), progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no corpus"):
        ensure_corpus(tmp_path / "other", cfg, progress=False)


class _Reader:
    """What group selection reads of a ShapeDataset: uids, their source labels, the split."""

    def __init__(self, sources: dict[str, str | None], val: set[str]):
        from mar3d.data.splits import DatasetSplit

        self.uids, self.sources = list(sources), list(sources.values())
        self.split_info = DatasetSplit(train=frozenset(set(sources) - val), val=frozenset(val),
                                       holdout_view=1, num_views=2)


def test_a_mixed_dataset_scores_scans_and_corpus_objects_in_their_own_groups():
    from mar3d.data.synth import SYNTH_SOURCE
    from mar3d.evaluate import EvalConfig, group_pools, select_groups

    sources = {"scan_a": None, "scan_b": None, "scan_c": None,
               **{f"synth_{i}": SYNTH_SOURCE for i in range(6)}, "objaverse_x": "objaverse-1.0"}
    reader = _Reader(sources, val={"scan_c", "synth_0", "synth_1", "synth_2"})
    pools = group_pools(reader)
    assert pools["seen_view"] == ({"scan_a", "scan_b", "objaverse_x"},) * 2
    assert pools["heldout_objects"] == ({"scan_c"}, {"scan_a", "scan_b", "objaverse_x"})
    assert pools["synth_heldout"] == ({"synth_0", "synth_1", "synth_2"}, {"synth_3", "synth_4", "synth_5"})
    assert pools["all_objects"][0] == set(sources)
    cfg = EvalConfig(groups=("seen_view", "heldout_objects", "synth_heldout"), max_objects=1,
                     group_max_objects={"synth_heldout": 2}, distinct_families=False)
    groups = {g.name: g for g in select_groups(reader, cfg)}
    assert [len(groups[n].uids) for n in cfg.groups] == [1, 1, 2]
    assert set(groups["synth_heldout"].uids) <= {"synth_0", "synth_1", "synth_2"}
    assert groups["synth_heldout"].training_pool == {"synth_3", "synth_4", "synth_5"}
    # A dataset that is all corpus: the scan groups take its objects rather than none.
    only = _Reader({f"synth_{i}": SYNTH_SOURCE for i in range(4)}, val={"synth_0", "synth_1"})
    assert group_pools(only)["heldout_objects"] == group_pools(only)["synth_heldout"]
    with pytest.raises(ValueError, match="unknown group"):
        EvalConfig(group_max_objects={"nope": 3}).validate()
    with pytest.raises(ValueError, match=">= 1"):
        EvalConfig(group_max_objects={"synth_heldout": 0}).validate()


@pytest.mark.e2e
def test_scans_and_a_corpus_make_one_dataset_scored_per_collection(tmp_path, ray_local):
    import csv

    from _shards import small_data_config
    from _tiny_release import write_tiny_release
    from mar3d.data.dataset import ShapeDataset
    from mar3d.data.prepare import prepare_dataset
    from mar3d.data.synth import SYNTH_SOURCE
    from mar3d.evaluate import EvalConfig, evaluate, evaluation_table, group_pools
    from mar3d.inference import PipelineConfig
    from mar3d.models.mar import SamplingConfig

    # Scans (OBJ, z-up as YCB's) and a procedural corpus made by the job itself (glTF, +Y
    # up, turned into the z-up dataset's frame).
    scans = tmp_path / "scans"
    scans.mkdir()
    trimesh.creation.box((0.3, 0.3, 1.0)).export(scans / "post.obj")
    trimesh.creation.icosphere(2).export(scans / "ball.obj")
    trimesh.creation.cylinder(0.5, 0.2, sections=24).export(scans / "disc.obj")
    cfg = small_data_config()
    cfg.render_up_axis, cfg.synth_objects = "z", 6
    data = tmp_path / "data"
    prepared = prepare_dataset(scans, data, cfg, progress=False)
    assert (prepared.num_rows, prepared.num_errors) == (9, 0)
    # CPU seconds by stage, for the scale benchmark; closed corpus meshes skip the grid.
    stages = prepared.to_dict()["stage_cpu_seconds"]
    assert set(stages) == {"load", "watertight", "sample", "label", "render", "write"}
    assert stages["label"] > 0 and stages["render"] > 0
    corpus = data / "corpus"
    paths = _read_gz(corpus / "object-paths.json.gz")
    assert len(paths) == 6
    again = prepare_dataset(scans, data, cfg, progress=False)  # the corpus is not made again
    assert (again.processed, again.skipped, again.num_rows) == (0, 9, 9)

    reader = ShapeDataset(data, num_occ=1, near_fraction=0.0, with_image=False)
    by_source = dict(zip(reader.uids, reader.sources))
    assert sorted(s for s in by_source.values() if s) == [SYNTH_SOURCE] * 6
    # Every synth object stands up along z: lathe bodies and boxes are made +Y up in glTF.
    for uid, src in by_source.items():
        if src == SYNTH_SOURCE and "bottle" in uid:
            level = reader.read_row(reader.uids.index(uid))["surface_0"][:, :3]
            assert np.ptp(level[:, 2]) > np.ptp(level[:, 1])

    # Batch generation can leave the corpus out (the local demo generates for its scans).
    from mar3d.generate import GenerateConfig, list_inputs

    scan_uids = sorted(u for u, src in by_source.items() if src is None)
    kept = list_inputs(data, GenerateConfig(exclude_sources=(SYNTH_SOURCE,)))
    assert sorted(i["id"].rsplit("_v", 1)[0] for i in kept) == scan_uids
    assert len(list_inputs(data, GenerateConfig())) == 9

    release = write_tiny_release(tmp_path / "release")
    fast = SamplingConfig(num_inference_steps=4, diffusion_steps=5)
    ecfg = EvalConfig(pipeline=PipelineConfig(use_hr=False, sampling=fast, resolution=32),
                      num_points=2000, previews=0, with_iou=False, device="cpu", contact_sheet=False,
                      groups=("heldout_objects", "synth_heldout", "all_objects"))
    result = evaluate(str(release), data, tmp_path / "out", ecfg,
                      tracking_uri=f"sqlite:///{tmp_path / 'db'}", progress=False)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    pools = group_pools(reader)
    for name in ecfg.groups:
        assert set(report["groups"][name]["objects"]) == pools[name][0]
        if name in report["baselines"]:  # chosen among the group's own collection
            assert report["baselines"][name]["uid"] in pools[name][1]
    assert set(report["groups"]["synth_heldout"]["objects"]) | set(report["groups"]["heldout_objects"]["objects"]) \
        == reader.split_info.val
    rows = {r["uid"]: r for r in result.per_object if r["group"] == "all_objects"}
    assert sorted(r["source_uid"] for r in rows.values() if r["source_uid"]) == sorted(paths)
    # Category accuracy where every object has a category (the corpus group), not where
    # scans without one take part.
    m = result.metrics
    assert 0 <= m["synth_heldout/category_accuracy"] <= 1
    assert 0 <= m["synth_heldout/baseline/category_accuracy"] <= 1
    assert "all_objects/category_accuracy" not in m
    with open(tmp_path / "out" / "per_category_synth_heldout.csv") as f:
        counts = {r["category"]: int(r["objects"]) for r in csv.DictReader(f)}
    assert set(counts) <= set(CATEGORIES) and sum(counts.values()) == len(pools["synth_heldout"][0])
    assert "| category accuracy ↑ |" in evaluation_table(result)
