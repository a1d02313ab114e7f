"""Objaverse layouts as `mar3d data prepare` inputs: an Objaverse 1.0 tree (object paths,
LVIS categories, metadata) and an Objaverse-XL annotations table, built here in tmp_path.

Discovery, selection, hashing and planning are tested without Ray; one module fixture
runs the real data job on three tiny meshes and the tests after it check that the rows,
error rows and the readers of evaluation and generation carry the labels."""
from __future__ import annotations

import csv
import gzip
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import trimesh

from mar3d.config import to_dict
from mar3d.data.config import DataConfig, small_test_config
from mar3d.data.prepare import MANIFEST, find_inputs, read_errors, write_shard
from mar3d.data.prepare.inputs import _hash_item
from mar3d.data.prepare.job import _open_existing, _plan
from mar3d.data.schema import ERRORS_SCHEMA, LABEL_COLUMNS
from mar3d.data.sources import OBJAVERSE_SOURCE, Selection, read_uid_list

BOX, CAN, BALL, CONE, GONE = ("0a" * 16, "1b" * 16, "2c" * 16, "3d" * 16, "4e" * 16)
MESHES = {  # uid -> (glbs folder, mesh); GONE is listed but its file was never downloaded
    BOX: ("000-000", lambda: trimesh.creation.box(extents=(1.0, 0.6, 0.4))),
    CAN: ("000-000", lambda: trimesh.creation.cylinder(radius=0.3, height=1.0, sections=16)),
    BALL: ("000-001", lambda: trimesh.creation.icosphere(subdivisions=1)),
    CONE: ("000-000", lambda: trimesh.creation.cone(radius=0.4, height=1.0, sections=16)),
    GONE: ("000-001", None),
}
LVIS = {"box": [BOX], "can": [CAN], "ball": [BALL, GONE]}  # CONE has no category
METADATA = {BOX: {"name": "Wooden crate", "license": "by", "uid": BOX, "viewCount": 3},
            CAN: {"name": "Soda can", "license": "by-nc", "uid": CAN}}  # 000-001 has no file


def _write_json_gz(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(json.dumps(data).encode()))


def make_objaverse_tree(root: Path) -> Path:
    """A tiny Objaverse 1.0 tree as the objaverse package's HF dataset lays it out."""
    paths = {}
    for uid, (folder, make) in MESHES.items():
        paths[uid] = f"glbs/{folder}/{uid}.glb"
        if make is not None:
            (root / "glbs" / folder).mkdir(parents=True, exist_ok=True)
            (root / paths[uid]).write_bytes(make().export(file_type="glb"))
    _write_json_gz(root / "object-paths.json.gz", paths)
    _write_json_gz(root / "lvis-annotations.json.gz", LVIS)
    _write_json_gz(root / "metadata" / "000-000.json.gz", METADATA)
    return root


@pytest.fixture
def tree(tmp_path) -> Path:
    return make_objaverse_tree(tmp_path / "hf-objaverse-v1")


def _by_uid(inputs) -> dict[str, dict]:
    return {labels["source_uid"]: {**labels, "path": path} for path, labels in inputs.labels.items()}


# ------------------------------------------------------------------- discovery, no Ray
def test_tree_lists_every_object_with_its_labels_and_missing_files_as_errors(tree):
    inputs = find_inputs(tree)
    assert inputs.paths == sorted(inputs.paths) and len(inputs.paths) == 4
    found = _by_uid(inputs)
    assert set(found) == {BOX, CAN, BALL, CONE}
    assert found[BOX] == {"source_uid": BOX, "category": "box", "name": "Wooden crate",
                          "license": "by", "source": OBJAVERSE_SOURCE,
                          "path": str(tree.resolve() / "glbs" / "000-000" / f"{BOX}.glb")}
    assert found[CONE]["category"] is None and found[CONE]["name"] is None
    assert found[BALL]["category"] == "ball" and found[BALL]["license"] is None  # no 000-001 metadata
    [error] = inputs.errors
    assert error["reason"] == "not_found" and error["source_uid"] == GONE
    assert error["source_path"].endswith(f"{GONE}.glb")
    # The object-paths file names the same tree; an uncompressed listing works too.
    assert find_inputs(tree / "object-paths.json.gz") == inputs
    paths = json.loads(gzip.decompress((tree / "object-paths.json.gz").read_bytes()))
    (tree / "object-paths.json.gz").unlink()
    (tree / "object-paths.json").write_text(json.dumps(paths))
    assert find_inputs(tree).paths == inputs.paths


def test_categories_select_their_objects_only(tree):
    inputs = find_inputs(tree, Selection(categories=("ball", "box")))
    assert set(_by_uid(inputs)) == {BOX, BALL}
    assert [e["source_uid"] for e in inputs.errors] == [GONE]  # selected, so reported


def test_unknown_category_is_an_error_naming_known_ones(tree):
    with pytest.raises(ValueError, match=r"unknown LVIS categories \['bxo'\].*'ball'.*did you mean \['box'\]"):
        find_inputs(tree, Selection(categories=("box", "bxo")))


def test_uid_list_selects_and_reports_uids_the_tree_lacks(tree, tmp_path):
    uid_file = tmp_path / "uids.txt"
    uid_file.write_text(f"# wanted\n{CAN}\n\n  {CONE}\n{'ff' * 16}\n")
    selection = Selection(uids=read_uid_list(str(uid_file)))
    inputs = find_inputs(tree, selection)
    assert set(_by_uid(inputs)) == {CAN, CONE}
    [error] = inputs.errors
    assert error == {**error, "reason": "not_found", "source_uid": "ff" * 16}
    assert error["source_path"].endswith(f"object-paths.json.gz#{'ff' * 16}")
    # Combined with categories: a uid outside every listed category is not selected.
    both = find_inputs(tree, Selection(categories=("can", "box"), uids=selection.uids))
    assert set(_by_uid(both)) == {CAN} and not both.errors


def test_limit_takes_the_first_uids_in_sorted_order(tree):
    first = find_inputs(tree, Selection(limit=2))
    assert set(_by_uid(first)) == {BOX, CAN}  # sorted(all uids)[:2], whatever the JSON order
    last = find_inputs(tree, Selection(categories=("ball",), limit=2))
    assert set(_by_uid(last)) == {BALL} and [e["source_uid"] for e in last.errors] == [GONE]


def test_tree_paths_may_not_escape_the_tree(tree, tmp_path):
    trimesh.creation.box().export(tmp_path / "outside.glb")
    _write_json_gz(tree / "object-paths.json.gz", {BOX: f"glbs/000-000/{BOX}.glb", CAN: "../outside.glb"})
    inputs = find_inputs(tree)
    assert set(_by_uid(inputs)) == {BOX}
    assert [(e["reason"], e["source_uid"]) for e in inputs.errors] == [("path_outside_root", CAN)]


def test_selection_is_refused_for_inputs_without_source_uids(tmp_path):
    trimesh.creation.box().export(tmp_path / "box.glb")
    with pytest.raises(ValueError, match="Objaverse 1.0 tree or an Objaverse-XL table"):
        find_inputs(tmp_path, Selection(limit=1))
    assert find_inputs(tmp_path).labels == {}  # plain folders have no labels


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_xl_table(root: Path, fmt: str) -> Path:
    """An Objaverse-XL annotations table with local_path: one good file, one whose
    recorded sha256 is wrong, one never downloaded (empty local_path)."""
    (root / "files").mkdir(parents=True)
    trimesh.creation.box().export(root / "files" / "good.glb")
    trimesh.creation.icosphere(subdivisions=1).export(root / "files" / "changed.glb")
    rows = [
        {"fileIdentifier": "https://github.com/a/b/blob/main/good.glb", "sha256": _sha256(root / "files" / "good.glb"),
         "source": "github", "license": "MIT", "local_path": "files/good.glb"},
        {"fileIdentifier": "https://github.com/a/b/blob/main/changed.glb", "sha256": "0" * 64,
         "source": "github", "license": None, "local_path": "files/changed.glb"},
        {"fileIdentifier": "https://www.thingiverse.com/thing:1", "sha256": "1" * 64,
         "source": "thingiverse", "license": "cc-by", "local_path": ""},
    ]
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), root / "annotations.parquet")
        return root / "annotations.parquet"
    with open(root / "annotations.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root / "annotations.csv"


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_xl_table_checks_sha256_and_keeps_its_labels(tmp_path, fmt):
    table = make_xl_table(tmp_path, fmt)
    inputs = find_inputs(table)
    found = _by_uid(inputs)
    assert set(found) == {"https://github.com/a/b/blob/main/good.glb", "https://github.com/a/b/blob/main/changed.glb"}
    good = found["https://github.com/a/b/blob/main/good.glb"]
    assert (good["source"], good["license"], good["category"]) == ("github", "MIT", None)
    [missing] = inputs.errors
    assert missing["reason"] == "not_found" and missing["source_uid"] == "https://www.thingiverse.com/thing:1"
    # Hashing (the Ray task body) and planning, without Ray: the wrong sha256 is an error row.
    hashed = sorted(({**_hash_item({"source_path": p, "expected_sha256": inputs.expected_sha256.get(p, "")}),
                      **inputs.labels_of(p)} for p in inputs.paths), key=lambda h: h["source_path"])
    plan = _plan(hashed, inputs.errors, ERRORS_SCHEMA.empty_table(), set(), small_test_config())
    assert [t["source_uid"] for t in plan.todo] == ["https://github.com/a/b/blob/main/good.glb"]
    assert plan.todo[0]["license"] == "MIT"
    mismatch = next(e for e in plan.new_errors if e["reason"] == "sha256_mismatch")
    assert mismatch["source_uid"] == "https://github.com/a/b/blob/main/changed.glb"
    assert _sha256(tmp_path / "files" / "changed.glb") in mismatch["message"] and "0" * 64 in mismatch["message"]
    assert mismatch["source_sha256"] is None  # so a corrected table makes the file eligible again
    with pytest.raises(ValueError, match="no categories"):
        find_inputs(table, Selection(categories=("chair",)))
    assert len(find_inputs(table, Selection(limit=1)).paths) == 1


def test_plain_csv_manifest_is_not_an_xl_table(tmp_path):
    trimesh.creation.box().export(tmp_path / "box.stl")
    (tmp_path / "list.csv").write_text("path\nbox.stl\n")
    inputs = find_inputs(tmp_path / "list.csv")
    assert [Path(p).name for p in inputs.paths] == ["box.stl"] and inputs.labels == {}


def test_cli_flags_become_the_config_selection(tmp_path):
    from mar3d.cli import build_parser
    from mar3d.cli.data import apply_selection_flags

    args = build_parser().parse_args(["data", "prepare", "--input", "in", "--output", "out",
                                      "--categories", "chair, table", "--uids", "uids.txt", "--limit", "5"])
    cfg = DataConfig()
    apply_selection_flags(cfg, args)
    cfg.validate()
    assert cfg.select_categories == ("chair", "table") and cfg.select_limit == 5
    assert Path(cfg.select_uids_file).is_absolute() and cfg.select_uids_file.endswith("uids.txt")
    with pytest.raises(ValueError, match="select_limit"):
        DataConfig(select_limit=0).validate()


# ----------------------------------------------------------- datasets written before labels
def test_datasets_without_label_columns_stay_readable_and_keep_their_schema(tmp_path):
    cfg = small_test_config()
    old_errors = pa.table({"source_path": ["a.glb"], "source_sha256": [None], "uid": [None],
                           "reason": ["empty"], "message": ["no triangles"]},
                          schema=pa.schema([f for f in ERRORS_SCHEMA if f.name != "source_uid"]))
    pq.write_table(old_errors, tmp_path / "errors.parquet")
    assert read_errors(tmp_path).to_pylist() == [{**old_errors.to_pylist()[0], "source_uid": None}]
    old_shard = pa.schema([pa.field("uid", pa.string(), nullable=False)])
    batch = pa.RecordBatch.from_pylist([{"uid": "0123456789abcdef-box"}], schema=old_shard)
    (tmp_path / "shards").mkdir()
    entry = write_shard(tmp_path, "shards/shard-00000.parquet", [batch], old_shard)
    (tmp_path / MANIFEST).write_text(json.dumps({"schema_version": 1, "config": to_dict(cfg),
                                                 "columns": {"uid": "string"}, "shards": [entry]}))
    shards, done, with_labels = _open_existing(tmp_path, cfg)
    assert len(shards) == 1 and done == {"0123456789abcdef-box"} and with_labels is False


def test_generation_results_written_before_labels_stay_readable(tmp_path):
    from mar3d.generate import RESULTS, RESULTS_SCHEMA, read_results

    old = pa.schema([f for f in RESULTS_SCHEMA if f.name not in ("source_uid", "category")])
    pq.write_table(pa.Table.from_pylist([{"id": "a.png", "status": "ok"}], schema=old), tmp_path / RESULTS)
    [row] = read_results(tmp_path).to_pylist()
    assert (row["id"], row["source_uid"], row["category"]) == ("a.png", None, None)


# ------------------------------------------------------------------- the real job, once
@pytest.fixture(scope="module")
def prepared_tree(tmp_path_factory, ray_local):
    from mar3d.data.prepare import prepare_dataset

    root = make_objaverse_tree(tmp_path_factory.mktemp("objaverse") / "hf-objaverse-v1")
    out = tmp_path_factory.mktemp("prepared") / "data"
    # The smallest settings that still run every step; box, can and the missing ball.
    cfg = small_test_config(surface_sizes=(512, 128, 32), num_vol=512, num_near=512,
                            render_resolution=32, shard_size=4, cpus_per_task=0.5,
                            select_categories=("box", "ball", "can"))
    result = prepare_dataset(root, out, cfg, progress=False)
    return out, result


@pytest.mark.e2e
def test_prepared_rows_and_errors_carry_the_objaverse_labels(prepared_tree):
    out, result = prepared_tree
    assert (result.processed, result.failed, result.total_rows) == (3, 1, 3)
    [shard] = result.shards_written
    rows = pq.read_table(out / shard, columns=["uid", *LABEL_COLUMNS]).to_pylist()
    by_uid = {r["source_uid"]: r for r in rows}
    assert set(by_uid) == {BOX, CAN, BALL}
    assert by_uid[BOX] == {**by_uid[BOX], "category": "box", "name": "Wooden crate", "license": "by",
                           "source": OBJAVERSE_SOURCE}
    assert by_uid[CAN]["license"] == "by-nc" and by_uid[BALL]["name"] is None
    assert by_uid[BOX]["uid"].endswith(f"-{BOX}")  # the dataset uid keeps the Objaverse uid as its stem
    manifest = json.loads((out / MANIFEST).read_text())
    assert set(LABEL_COLUMNS) <= set(manifest["columns"])
    assert manifest["config"]["select_categories"] == ["box", "ball", "can"]
    [error] = read_errors(out).to_pylist()
    assert (error["reason"], error["source_uid"]) == ("not_found", GONE)


@pytest.mark.e2e
def test_evaluation_and_generation_inputs_carry_source_uid_and_category(prepared_tree):
    from mar3d.data import ShapeDataset
    from mar3d.evaluate import EvalRows
    from mar3d.generate import GenerateConfig, list_inputs
    from mar3d.generate.results import _result_row

    out, _ = prepared_tree
    reader = ShapeDataset(out, num_occ=256)
    rows = EvalRows(reader)
    labels = {(r["source_uid"], r["category"]) for r in (rows.get(i, 0) for i in range(len(reader)))}
    assert labels == {(BOX, "box"), (CAN, "can"), (BALL, "ball")}
    items = list_inputs(out, GenerateConfig())
    assert {(it["source_uid"], it["category"]) for it in items} == labels
    row = _result_row(items[0], "ok")
    assert (row["source_uid"], row["category"]) == (items[0]["source_uid"], items[0]["category"])
