"""Bad input: a generated corpus of malformed and hostile meshes and images goes through
the data job and the batch-generation job, mixed with valid inputs. Every bad input must
become an error row with its expected reason and a readable message; no job crashes;
every valid input (and every hostile-but-repairable one) becomes a row. Also: the limits
are configurable and their defaults are the documented safe values."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import trimesh

from corpus import (write_hostile_manifest, write_image_corpus, write_image_parquet,
                    write_mesh_corpus)
from mar3d.data import prepare_dataset
from mar3d.data.config import DataConfig, small_test_config
from mar3d.data.errors import REASONS, MeshError
from mar3d.data.mesh_io import load_mesh
from mar3d.data.prepare import read_errors
from mar3d.data.schema import column_to_numpy
from mar3d.generate import GenerateConfig, batch_generate, read_results
from mar3d.inference import PipelineConfig, InvalidImageError, load_image
from mar3d.models.mar import SamplingConfig

from _tiny_release import write_tiny_release

pytestmark = pytest.mark.e2e

VALID_YCB = ["013_apple", "077_rubiks_cube"]
FAST = dict(sampling=SamplingConfig(num_inference_steps=4, diffusion_steps=5), resolution=32)


def _readable(message: str) -> bool:
    return bool(message) and len(message) >= 10 and "Traceback" not in message


# ------------------------------------------------------------------------- data prepare
@pytest.fixture(scope="module")
def mesh_job(tmp_path_factory, ycb_root, ray_local):
    base = tmp_path_factory.mktemp("mesh_corpus")
    manifest_dir = base / "inputs"
    corpus_dir = manifest_dir / "corpus"
    cases = write_mesh_corpus(corpus_dir)
    valid = []
    for name in VALID_YCB:  # copies: a symlink out of the manifest root is refused (tested)
        shutil.copytree(ycb_root / name, manifest_dir / "valid" / name)
        valid.append(f"valid/{name}/textured.obj")
    trimesh.creation.box(extents=(1.0, 0.6, 0.4)).export(manifest_dir / "valid" / "box.glb")
    valid.append("valid/box.glb")
    manifest, manifest_cases = write_hostile_manifest(corpus_dir, manifest_dir)
    with open(manifest, "a") as f:
        f.writelines(f'{{"path": "{v}"}}\n' for v in valid)
        f.write('{"path": "valid/box.glb"}\n')  # listed twice: one row, one duplicate error
    out = base / "out"
    cfg = small_test_config(shard_size=2)  # default limits: max_faces 2M, max_file_bytes 512 MiB
    result = prepare_dataset(manifest, out, cfg, progress=False)
    return dict(manifest_dir=manifest_dir, corpus_dir=corpus_dir, cases=cases,
                manifest_cases=manifest_cases, valid=valid, out=out, cfg=cfg, result=result)


def test_every_bad_mesh_is_an_error_row_with_its_reason(mesh_job, reliability_report):
    job = mesh_job
    corpus_dir, manifest_dir, out = job["corpus_dir"], job["manifest_dir"], job["out"]
    errors = read_errors(out).to_pylist()
    shards = [pq.read_table(out / e["file"], columns=["source_path", "surface_0"])
              for e in json.loads((out / "manifest.json").read_text())["shards"]]
    row_paths = {p for t in shards for p in t.column("source_path").to_pylist()}

    def outcome(key_candidates: list[str]) -> tuple[str, str]:
        for e in errors:
            if e["source_path"] in key_candidates:
                return e["reason"], e["message"]
        if any(k in row_paths for k in key_candidates):
            return "ok", ""
        return "MISSING", ""

    mismatches = []
    for case in job["cases"]:
        path = str((corpus_dir / case.name).resolve())
        got, message = outcome([path])
        if got != case.expect or (got != "ok" and not _readable(message)):
            mismatches.append((case.name, case.expect, got, message))
        reliability_report.add("bad inputs: data prepare", input=case.name, expected=case.expect,
                               got=got, what=case.what)
    for case in job["manifest_cases"]:
        resolved = None
        try:
            resolved = str((manifest_dir / case.name).resolve())
        except (OSError, ValueError):
            pass
        got, message = outcome([case.name] + ([resolved] if resolved else []))
        if got != case.expect or not _readable(message):
            mismatches.append((case.name[:60], case.expect, got, message))
        reliability_report.add("bad inputs: data prepare", input=repr(case.name[:40]), expected=case.expect,
                               got=got, what=case.what)
    assert not mismatches, mismatches

    # Valid inputs in the same batch all became rows, finite and inside the unit cube.
    for v in job["valid"]:
        assert str((manifest_dir / v).resolve()) in row_paths, v
    # Finite, and in the unit cube up to the watertight offset (1 voxel + marching cubes).
    voxel = 2 * job["cfg"].vol_bound / job["cfg"].watertight_resolution
    for table in shards:
        surface = column_to_numpy(table.column("surface_0"))
        assert np.isfinite(surface).all() and (abs(surface[..., :3]) <= 1 + 2 * voxel).all()
    dup = [e for e in errors if e["reason"] == "duplicate"]
    assert len(dup) == 1 and "already lists" in dup[0]["message"]

    # Nothing lost: every manifest entry is exactly one row or one error row.
    result = job["result"]
    entries = len(job["cases"]) + len(job["manifest_cases"]) + len(job["valid"]) + 1
    assert result.inputs == entries
    assert result.total_rows + result.total_errors == entries
    assert not [e for e in errors if e["reason"] == "internal_error"]
    assert all(e["reason"] in REASONS for e in errors)
    ok_cases = sum(c.expect == "ok" for c in job["cases"])
    reliability_report.add("bad inputs: data prepare", input="'valid/box.glb' again", expected="duplicate",
                           got="duplicate", what="manifest lists the same file twice")
    reliability_report.add(
        "bad inputs: totals", job="data prepare", inputs=entries,
        bad=entries - len(job["valid"]) - ok_cases, error_rows=result.total_errors,
        rows=result.total_rows, valid_ok=f"{len(job['valid'])}/{len(job['valid'])}",
        repaired=ok_cases, crashes=0, lost=entries - result.total_rows - result.total_errors)


def test_mesh_limits_are_configurable_with_safe_defaults(tmp_path):
    defaults = DataConfig()
    assert defaults.max_faces == 2_000_000 and defaults.max_file_bytes == 512 * 1024 * 1024
    box = tmp_path / "box.ply"
    trimesh.creation.box().export(box)  # 12 faces, ~400 bytes
    load_mesh(box, defaults.max_faces, defaults.max_file_bytes)
    with pytest.raises(MeshError) as e:
        load_mesh(box, max_faces=11, max_file_bytes=defaults.max_file_bytes)
    assert e.value.reason_code == "too_many_faces"
    with pytest.raises(MeshError) as e:
        load_mesh(box, max_faces=defaults.max_faces, max_file_bytes=100)
    assert e.value.reason_code == "file_too_large"
    # An OBJ's face count is checked before parsing, polygons counted as triangles.
    quad = tmp_path / "quads.obj"
    quad.write_text("v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\n" + "f 1 2 3 4\n" * 6)
    with pytest.raises(MeshError, match="declares 12 triangles"):
        load_mesh(quad, max_faces=11, max_file_bytes=defaults.max_file_bytes)


# ----------------------------------------------------------------------------- generate
@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_tiny_release(tmp_path_factory.mktemp("release"))


def _gen_cfg() -> GenerateConfig:
    cfg = GenerateConfig(pipeline=PipelineConfig(**FAST), num_actors=2, cpus_per_actor=0.5,
                         batch_size=2)
    cfg.validate()
    return cfg


def test_every_bad_image_is_an_error_row_with_its_reason(ray_local, release, tmp_path, reliability_report):
    folder = tmp_path / "images"
    cases, good = write_image_corpus(folder)
    parquet = tmp_path / "rows.parquet"
    parquet_cases = write_image_parquet(parquet)
    totals = []
    for source, out in [(folder, tmp_path / "out_folder"), (parquet, tmp_path / "out_parquet")]:
        result = batch_generate(str(source), str(release), str(out), _gen_cfg(), progress=False)
        table = read_results(out).to_pylist()
        totals.append((source, result, table))

    _, folder_result, folder_rows = totals[0]
    by_name = {Path(r["input"]).name: r for r in folder_rows}
    assert len(folder_rows) == len(cases) + len(good) == folder_result.total
    mismatches = []
    for case in cases:
        r = by_name.get(case.name)
        got = "MISSING" if r is None else (r["reason"] or r["status"])
        if got != case.expect or not _readable(r["error"] if r else ""):
            mismatches.append((case.name, case.expect, got, r and r["error"]))
        reliability_report.add("bad inputs: generate", input=case.name, expected=case.expect, got=got,
                               what=case.what)
    for name in good:
        r = by_name[name]
        if r["status"] != "ok" or r["num_faces"] <= 0:
            mismatches.append((name, "ok", r["reason"], r["error"]))

    _, parquet_result, parquet_rows = totals[1]
    assert len(parquet_rows) == len(parquet_cases) == parquet_result.total
    by_row = {int(r["input"].rsplit("#row=", 1)[1]): r for r in parquet_rows}
    for i, (raw, expect) in enumerate(parquet_cases):
        r = by_row.get(i)
        got = "MISSING" if r is None else (r["reason"] or r["status"])
        if got != expect:
            mismatches.append((f"row {i} id {raw!r}", expect, got, r and r["error"]))
        reliability_report.add("bad inputs: generate", input=f"Parquet row id {raw!r}", expected=expect,
                               got=got, what="a row of a Parquet input")
    for r in parquet_rows:
        if r["reason"]:
            assert _readable(r["error"]), r
    assert not mismatches, mismatches
    assert not [r for r in folder_rows + parquet_rows if r["reason"] == "internal_error"]

    inputs = len(folder_rows) + len(parquet_rows)
    ok = sum(r["status"] == "ok" for r in folder_rows + parquet_rows)
    valid = len(good) + sum(expect == "ok" for _, expect in parquet_cases)
    assert ok == valid
    reliability_report.add(
        "bad inputs: totals", job="generate", inputs=inputs, bad=inputs - valid,
        error_rows=inputs - ok, rows=ok, valid_ok=f"{ok}/{valid}", repaired=0, crashes=0,
        lost=inputs - len(folder_rows) - len(parquet_rows))


def test_image_limits_are_configurable_with_safe_defaults():
    defaults = PipelineConfig()
    assert defaults.min_image_side == 32 and defaults.max_image_pixels == 4096 * 4096
    img = np.zeros((64, 64, 3), np.uint8)
    assert load_image(img).shape == (64, 64, 4)
    with pytest.raises(InvalidImageError, match="over the limit"):
        load_image(img, PipelineConfig(max_image_pixels=64 * 63, min_image_side=8))
    with pytest.raises(InvalidImageError, match="at least 65"):
        load_image(img, PipelineConfig(min_image_side=65))
