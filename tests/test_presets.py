"""The shipped config presets (mar3d/configs/*.yaml): their values, how they are named,
and that they are found in an installed (non-editable) copy of the package.

``fixtures/preset_values.json`` holds every preset's values as the code loaded them
before the presets moved into the package and shared their model blocks by reference
(commit c3e09c6: each file loaded into its dataclass by path, ``mar_*.yaml`` also per
section, the lr/hr training presets with ``VAE_URI``). It was written once from that
commit and must not be regenerated to make a test pass: a preset whose values change
is a behaviour change. The lr/hr training presets lost their dead ``vae:`` sections
since; those held the VAEConfig defaults, so ``vae`` still loads to the same values.
``TrainConfig.data_loader`` was removed (training data has one path, Ray Data): every
training preset had ``data_loader: ray``, so the test checks that and compares the rest.
``DataConfig.watertight_method`` was added later on purpose: the data presets
now put their geometry on the input surface ("snap"), a measured behaviour change
(benchmarks/data_fidelity.py); the test checks that value and compares the rest.
``ConditionConfig.init_seed`` and ``TrainConfig.condition_model_uri`` were added with the
one shared image encoder per release: the seed random encoder weights come
from (0) and "" (build the encoder from the config); checked the same way, at any depth.
``PipelineConfig.kv_top_k`` / ``kv_block`` / ``kv_score_queries`` (adaptive KV selection)
were added later too, default off (exact decoding) in every preset.
``DataConfig.watertight_reuse_closed`` (on in every preset): a mesh that already bounds a
solid is sampled and labelled as it is instead of through the distance grid.
``DataConfig.select_categories`` / ``select_uids_file`` / ``select_limit`` (choosing objects
of an Objaverse tree or table) select everything in every preset.
``DataConfig.synth_objects`` / ``synth_seed`` and ``EvalConfig.group_max_objects`` were added
with training beyond the YCB scans: no corpus and no per-group limits by default; the
local demo's presets changed on purpose (``CHANGED``): ``data_local`` mixes a corpus of
1,000 objects into its scans, ``eval_tiny`` scores 100 held-out corpus objects too and
``generate_tiny`` (``GenerateConfig.exclude_sources``, added then) generates for the
scans only. ``EvalConfig.batch_size`` (objects generated together; scores do not depend
on it) was added with 8 everywhere.
Sampling took the diffusers names (``RENAMED``: ``num_iters`` is ``num_inference_steps``,
``cfg`` is ``guidance_scale``) and one config, ``SamplingConfig``: the inference settings
of the evaluation and generation presets (``generate:``, now ``pipeline:``) hold their
sampling overrides in a ``sampling`` block, and a model's sampling gained
``timestep_spacing`` (null: its diffusion config's); the values are the same.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

import mar3d
from mar3d.cli import main
from mar3d.config import (PRESET_DIR, ConfigError, config_path, load_config, preset_path, presets,
                          to_dict)
from mar3d.data.config import DataConfig
from mar3d.evaluate import EvalConfig
from mar3d.generate import GenerateConfig
from mar3d.models.condition import ConditionConfig
from mar3d.models.mar import MARConfig
from mar3d.models.vae import VAEConfig
from mar3d.train import load_train_config

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "preset_values.json"
EXPECTED = json.loads(FIXTURE.read_text())
VAE_URI = ["vae_model_uri=runs:/fixture/model"]  # lr/hr need one to validate

CLASSES = {"data": DataConfig, "data_local": DataConfig, "data_smoke": DataConfig,
           "eval_tiny": EvalConfig, "generate_tiny": GenerateConfig,
           "vae_tiny": VAEConfig, "vae_paper": VAEConfig}
# The cascade presets hold one section per part, each loaded on its own.
SECTION_CLASSES = {"condition": ConditionConfig, "lr": MARConfig, "hr": MARConfig}
SECTIONED = ("mar_tiny", "mar_paper")


def preset_values(key: str) -> dict:
    """Plain values of fixture entry ``key``: a preset name, or ``name#section``."""
    name, _, section = key.partition("#")
    if name.startswith("train_"):
        stage = name.split("_")[1]
        return to_dict(load_train_config(stage, name, [] if stage == "vae" else VAE_URI))
    if name in SECTIONED and not section:
        assert set(yaml.safe_load(config_path(name).read_text())) == set(SECTION_CLASSES), name
        return {s: preset_values(f"{name}#{s}") for s in SECTION_CLASSES}
    cls = SECTION_CLASSES[section] if section else CLASSES[name]
    return to_dict(load_config(cls, name, section=section or None))


# Keys removed from a config since the fixture was written -> the value every preset had
# (the behaviour that was kept).
REMOVED = {"data_loader": "ray"}
# Keys renamed since -> their name now, at any depth.
RENAMED = {"num_iters": "num_inference_steps", "cfg": "guidance_scale", "generate": "pipeline"}
SAMPLING = ("num_inference_steps", "guidance_scale", "temperature", "diffusion_steps", "timestep_spacing")
# Keys added to a config since -> the value every preset that has the key now loads.
ADDED = {"watertight_method": "snap", "watertight_reuse_closed": True, "init_seed": 0,
         "condition_model_uri": "", "feature_cache": "", "timestep_spacing": None,
         "kv_top_k": None, "kv_block": 1024, "kv_score_queries": 32,
         "select_categories": [], "select_uids_file": None, "select_limit": None,
         "synth_objects": 0, "synth_seed": 0, "group_max_objects": {}, "exclude_sources": [],
         "batch_size": 8, "latents": None, "view_pages": True, "gallery": True}
# Values a preset changed on purpose since -> (what it loads now, what the fixture has).
CHANGED = {"data_local": {"synth_objects": (1000, None)},
           "eval_tiny": {"groups": (["seen_view", "heldout_objects", "synth_heldout"],
                                    ["seen_view", "heldout_objects"]),
                         "group_max_objects": ({"synth_heldout": 100}, None),
                         "baseline_pool": (96, 256)},
           "generate_tiny": {"exclude_sources": (["mar3d-synth"], None)},
           # Faster steps (rows cached, no per-log Ray Train report) bought longer training.
           "train_vae_tiny": {"steps": (1200, 800), "checkpoint_every": (600, 400),
                              "eval_every": (600, 400), "cache_rows": (1100, 128)},
           "train_lr_tiny": {"steps": (1200, 800), "checkpoint_every": (600, 400),
                             "eval_every": (600, 400), "cache_rows": (1100, 128)},
           "train_hr_tiny": {"cache_rows": (1100, 128)}}


def renamed(values: dict) -> dict:
    """The fixture's ``values`` under today's names; the pipeline settings' sampling
    overrides moved into their ``sampling`` block."""
    out = {}
    for key, value in values.items():
        key = RENAMED.get(key, key)
        if isinstance(value, dict):
            value = renamed(value)
            if key == "pipeline":
                value = {"sampling": {k: value.pop(k) for k in SAMPLING}, **value}
        out[key] = value
    return out


def pop_added(loaded: dict, expected: dict) -> None:
    """Check and remove the ADDED keys that ``expected`` (the fixture) lacks, at any depth."""
    for key in list(loaded):
        if key in ADDED and key not in expected:
            assert loaded.pop(key) == ADDED[key], key
        elif isinstance(loaded[key], dict) and isinstance(expected.get(key), dict):
            pop_added(loaded[key], expected[key])


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_every_preset_loads_to_the_same_values_as_before(key):
    expected = renamed(EXPECTED[key])
    for removed, kept in REMOVED.items():
        if removed in expected:
            assert expected.pop(removed) == kept
    loaded = preset_values(key)
    for name, (now, before) in CHANGED.get(key, {}).items():
        assert loaded.pop(name) == now, name
        if before is not None:
            loaded[name] = before
    pop_added(loaded, expected)
    assert loaded == expected


def test_the_fixture_covers_every_shipped_preset():
    assert presets() == sorted(k for k in EXPECTED if "#" not in k)
    assert len(presets()) == 15


def test_training_presets_share_the_model_presets_instead_of_copying_them():
    for size in ("tiny", "paper"):
        assert load_train_config("vae", f"train_vae_{size}").vae == load_config(VAEConfig, f"vae_{size}")
        condition = load_config(ConditionConfig, f"mar_{size}", section="condition")
        for stage in ("lr", "hr"):
            text = config_path(f"train_{stage}_{size}").read_text()
            assert f"mar: mar_{size}.yaml#{stage}\n" in text and "\nvae:" not in text
            cfg = load_train_config(stage, f"train_{stage}_{size}", VAE_URI)
            assert (cfg.mar, cfg.condition) == (load_config(MARConfig, f"mar_{size}", section=stage), condition)


def test_a_users_file_may_reference_the_presets(tmp_path):
    (tmp_path / "my_lr.yaml").write_text("stage: lr\nsteps: 7\nwarmup_steps: 1\n"
                                         "mar: mar_paper.yaml#lr\ncondition: mar_paper.yaml#condition\n")
    cfg = load_train_config("lr", tmp_path / "my_lr.yaml", VAE_URI)
    assert cfg.steps == 7 and cfg.mar == load_config(MARConfig, "mar_paper", section="lr")
    assert cfg.condition == load_config(ConditionConfig, "mar_paper", section="condition")


# ------------------------------------------------------------------------ naming

def test_a_preset_is_named_with_or_without_yaml():
    path = PRESET_DIR / "train_vae_tiny.yaml"
    assert config_path("train_vae_tiny") == config_path("train_vae_tiny.yaml") == path
    assert preset_path("train_vae_tiny") == preset_path("train_vae_tiny.yaml") == path
    assert load_train_config("vae", "train_vae_tiny") == load_train_config("vae", path)


def test_an_existing_file_wins_over_a_preset_of_the_same_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.yaml").write_text("num_workers: 7\n")
    assert load_config(DataConfig, "data.yaml").num_workers == 7
    assert load_config(DataConfig, tmp_path / "data.yaml").num_workers == 7
    assert load_config(DataConfig, "data").num_workers == EXPECTED["data"]["num_workers"]
    assert preset_path("data.yaml") == PRESET_DIR / "data.yaml"  # presets only, never ./
    with pytest.raises(ConfigError, match="'./data.yaml' is not a preset"):
        preset_path("./data.yaml")


@pytest.mark.parametrize("name", ["train_vae_huge", "train_vae_huge.yaml", "configs/train_vae_tiny.yaml"])
def test_an_unknown_config_names_the_presets(name):
    with pytest.raises(ConfigError, match="does not exist") as err:
        load_train_config("vae", name)
    assert "presets: data, data_local," in str(err.value) and "train_vae_tiny" in str(err.value)


def test_cli_config_flags_take_preset_names(capsys):
    assert main(["config", "show", "train", "--config", "train_lr_paper.yaml", "--set", "steps=6000",
                 "--set", VAE_URI[0]]) == 0
    shown = capsys.readouterr().out
    assert "stage: lr\n" in shown and "steps: 6000\n" in shown and "width: 1024\n" in shown
    assert main(["config", "show", "vae", "--config", "nope"]) == 2
    err = capsys.readouterr().err
    assert "'nope' is not a preset" in err and "vae_paper" in err
    assert main(["config", "presets"]) == 0
    listed = [line.split() for line in capsys.readouterr().out.splitlines()]
    pipeline = sorted((PRESET_DIR / "pipeline").glob("*.yaml"))
    assert listed == [[name, str(preset_path(name))] for name in presets()] + [
        ["pipeline", path.stem, str(path)] for path in pipeline]
    assert [p.stem for p in pipeline] == ["paper", "small", "smoke", "tiny"]


# --------------------------------------------------------------- installed package

def test_presets_are_package_data_inside_mar3d():
    assert PRESET_DIR.parent == Path(mar3d.__file__).resolve().parent
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert package_data["mar3d"] == ["configs/*.yaml", "configs/pipeline/*.yaml", "viewer/page.html"]


def test_a_built_wheel_ships_and_finds_every_preset(tmp_path):
    """Build the wheel from a copy of the project, unpack it as pip installs it, and load
    presets from that copy (no source checkout next to it)."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(REPO / "mar3d", src / "mar3d", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(src)], check=True)
    wheel, = (tmp_path / "dist").glob("mar3d-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert sorted(p.stem for p in (site / "mar3d" / "configs").glob("*.yaml")) == presets()
    assert sorted(p.name for p in (site / "mar3d" / "configs" / "pipeline").glob("*.yaml")) == sorted(
        p.name for p in (PRESET_DIR / "pipeline").glob("*.yaml"))
    assert (site / "mar3d" / "viewer" / "page.html").is_file()  # the 3D pages' template
    code = ("import json, sys; from mar3d.config import config_path, to_dict; "
            "from mar3d.train import load_train_config; "
            "print(json.dumps([str(config_path('train_lr_paper')), "
            "to_dict(load_train_config('lr', 'train_lr_paper', sys.argv[1:]))]))")
    out = subprocess.run([sys.executable, "-c", code, *VAE_URI], cwd=tmp_path, check=True,
                         capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(site)}).stdout
    path, values = json.loads(out)
    assert Path(path) == site / "mar3d" / "configs" / "train_lr_paper.yaml"
    expected = {k: v for k, v in renamed(EXPECTED["train_lr_paper"]).items() if k not in REMOVED}
    pop_added(values, expected)
    assert values == expected
