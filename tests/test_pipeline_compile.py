"""The kfp v2 pipeline compiles to the DAG the issue asks for, the committed IR is current,
and the step runner's own logic (argv, results, failures) behaves. Running the pipeline
end to end is the job of the e2e test (kfp.local + real mar3d steps)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mar3d.config import PIPELINE_PRESET_DIR, ConfigError, config_path

from components import MAR3D_IMAGE
from components import _run
from pipelines.mar3d_pipeline import COMPILED, compile_pipeline

REPO = Path(__file__).resolve().parents[1]

# task -> upstream tasks, as compiled (kfp names tasks after their components).
EXPECTED_DEPENDENCIES = {
    "prepare": set(),
    "train-vae": {"prepare"},
    "train-lr": {"prepare", "train-vae"},
    "train-hr": {"prepare", "train-vae", "train-lr"},
    "evaluate": {"prepare", "train-vae", "train-lr", "train-hr"},
    "promote": {"train-vae", "train-lr", "train-hr", "evaluate"},
    "batch-generate": {"prepare", "promote"},
}

EXPECTED_PARAMETERS = {
    "dataset_uri": "STRING", "workdir": "STRING",
    "data_config": "STRING", "vae_config": "STRING", "lr_config": "STRING",
    "hr_config": "STRING", "eval_config": "STRING", "generate_config": "STRING",
    "data_overrides": "LIST", "vae_overrides": "LIST", "lr_overrides": "LIST",
    "hr_overrides": "LIST", "eval_overrides": "LIST", "generate_overrides": "LIST",
    "num_workers": "NUMBER_INTEGER", "use_gpu": "BOOLEAN",
    "mlflow_tracking_uri": "STRING", "model_name": "STRING",
    "gate_max_chamfer": "NUMBER_DOUBLE", "gate_min_fscore": "NUMBER_DOUBLE",
    "gate_beat_baseline": "BOOLEAN",
    "generate_input": "STRING", "ray_address": "STRING", "resume_run_id": "STRING",
    "feature_cache": "BOOLEAN",
}

# consumer task -> {input artifact: (producer task, output key)}
EXPECTED_ARTIFACT_EDGES = {
    "train-vae": {"dataset": ("prepare", "dataset")},
    "train-lr": {"dataset": ("prepare", "dataset"), "vae_model": ("train-vae", "model")},
    "train-hr": {"dataset": ("prepare", "dataset"), "vae_model": ("train-vae", "model"),
                 "lr_model": ("train-lr", "model")},  # LR's image encoder (condition_model_uri)
    "evaluate": {"dataset": ("prepare", "dataset"), "vae_model": ("train-vae", "model"),
                 "lr_model": ("train-lr", "model"), "hr_model": ("train-hr", "model")},
    "promote": {"vae_model": ("train-vae", "model"), "lr_model": ("train-lr", "model"),
                "hr_model": ("train-hr", "model"), "report": ("evaluate", "report")},
    "batch-generate": {"release": ("promote", "release"), "dataset": ("prepare", "dataset")},
}


def _load_ir(path) -> dict:
    """The compiled package: the pipeline spec, with kfp-kubernetes' platform spec (the
    second YAML document) under ``"platform"``."""
    spec, platform = yaml.safe_load_all(path.read_text())
    return {**spec, "platform": platform}


@pytest.fixture(scope="module")
def ir(tmp_path_factory) -> dict:
    return _load_ir(compile_pipeline(tmp_path_factory.mktemp("ir") / "mar3d.yaml"))


def test_every_step_pod_gets_its_credentials_from_secrets(ir):
    """On Kubeflow each step pod reads the Ray token and the pipeline's MLflow account from
    Secrets as the standard variables; no credential is a pipeline parameter."""
    executors = ir["platform"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert len(executors) == len(EXPECTED_DEPENDENCIES)
    for name, spec in executors.items():
        env = {(s["secretName"], k["secretKey"]): k["envVar"] for s in spec["secretAsEnv"]
               for k in s["keyToEnv"]}
        assert env == {("mar3d-ray-auth", "auth_token"): "RAY_AUTH_TOKEN",
                       ("mar3d-mlflow-pipeline", "username"): "MLFLOW_TRACKING_USERNAME",
                       ("mar3d-mlflow-pipeline", "password"): "MLFLOW_TRACKING_PASSWORD"}, name
    params = ir["root"]["inputDefinitions"]["parameters"]
    assert not [p for p in params if any(w in p.lower() for w in ("password", "token", "secret"))]


def test_dag_has_the_seven_steps_in_order(ir):
    tasks = ir["root"]["dag"]["tasks"]
    assert set(tasks) == set(EXPECTED_DEPENDENCIES)
    for name, upstream in EXPECTED_DEPENDENCIES.items():
        assert set(tasks[name].get("dependentTasks", [])) == upstream, name


def test_artifacts_flow_between_steps(ir):
    tasks = ir["root"]["dag"]["tasks"]
    for consumer, edges in EXPECTED_ARTIFACT_EDGES.items():
        artifacts = tasks[consumer]["inputs"]["artifacts"]
        got = {name: (a["taskOutputArtifact"]["producerTask"], a["taskOutputArtifact"]["outputArtifactKey"])
               for name, a in artifacts.items()}
        assert got == edges, consumer
    outputs = ir["components"]
    assert outputs["comp-prepare"]["outputDefinitions"]["artifacts"]["dataset"]["artifactType"]["schemaTitle"] == "system.Dataset"
    assert outputs["comp-train-vae"]["outputDefinitions"]["artifacts"]["model"]["artifactType"]["schemaTitle"] == "system.Model"
    assert outputs["comp-evaluate"]["outputDefinitions"]["artifacts"]["metrics"]["artifactType"]["schemaTitle"] == "system.Metrics"


def test_pipeline_parameters_are_typed(ir):
    params = ir["root"]["inputDefinitions"]["parameters"]
    assert {k: v["parameterType"] for k, v in params.items()} == EXPECTED_PARAMETERS
    # Only the data location and the output root have no default.
    assert {k for k, v in params.items() if not v.get("isOptional")} == {"dataset_uri", "workdir"}


def test_every_step_partitions_outputs_by_pipeline_job(ir):
    tasks = ir["root"]["dag"]["tasks"]
    for name in ("prepare", "train-vae", "train-lr", "train-hr", "evaluate", "batch-generate"):
        job_id = tasks[name]["inputs"]["parameters"]["job_id"]
        assert job_id == {"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}, name
        # ... unless the run continues an earlier one (`pipeline run --resume`).
        resume = tasks[name]["inputs"]["parameters"]["resume_run_id"]
        assert resume == {"componentInputParameter": "resume_run_id"}, name


def test_promote_is_never_cached(ir):
    assert ir["root"]["dag"]["tasks"]["promote"]["cachingOptions"] == {}


def test_promote_gets_the_baseline_floor_on_by_default(ir):
    params = ir["root"]["inputDefinitions"]["parameters"]
    assert params["gate_beat_baseline"]["defaultValue"] is True
    promote = ir["root"]["dag"]["tasks"]["promote"]["inputs"]["parameters"]
    assert promote["gate_beat_baseline"] == {"componentInputParameter": "gate_beat_baseline"}
    script = "\n".join(ir["deploymentSpec"]["executors"]["exec-promote"]["container"]["command"])
    assert "gate.beat_baseline=" in script


def test_executors_use_the_mar3d_image_and_install_nothing(ir):
    executors = ir["deploymentSpec"]["executors"]
    assert len(executors) == 7
    for name, spec in executors.items():
        container = spec["container"]
        assert container["image"] == MAR3D_IMAGE, name
        script = "\n".join(container["command"])
        assert "pip install" not in script, f"{name} installs packages at run time"
        # The library is imported inside the function body (lightweight component rule).
        assert "from components._run import" in script, name
        assert container["resources"]["cpuLimit"] and container["resources"]["memoryLimit"], name


def _without_volatile(ir: dict) -> dict:
    ir = dict(ir)
    ir.pop("sdkVersion", None)  # the kfp version that compiled it, not the pipeline
    return ir


def test_committed_ir_is_up_to_date(ir):
    assert COMPILED.is_file(), "run: python -m pipelines.mar3d_pipeline"
    committed = _load_ir(COMPILED)
    assert _without_volatile(committed) == _without_volatile(ir), (
        "pipelines/mar3d_pipeline.yaml is stale; regenerate with: python -m pipelines.mar3d_pipeline")


# ----------------------------------------------------------------- the step runner

def test_step_dir_is_keyed_by_job():
    assert _run.step_dir("/mnt/mar3d/runs/", "abc", "train") == "/mnt/mar3d/runs/abc/train"
    assert _run.step_dir("s3://bucket/runs", "abc", "data") == "s3://bucket/runs/abc/data"
    with pytest.raises(ValueError, match="workdir"):
        _run.step_dir("", "abc", "data")
    with pytest.raises(ValueError, match="job_id"):
        _run.step_dir("/w", "", "data")


def test_train_argv_puts_pipeline_values_last():
    argv = _run.train_argv("lr", "/d", "/w/j/train", "configs/x.yaml", ["steps=5", "num_workers=7"],
                           2, True, "http://mlflow:5000", vae_model_uri="runs:/abc/model")
    assert argv[:5] == ["mar3d", "train", "lr", "--config", "configs/x.yaml"]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert sets == ["steps=5", "num_workers=7", "data=/d", "storage_path=/w/j/train", "run_name=lr",
                    "num_workers=2", "use_gpu=true", "mlflow_uri=http://mlflow:5000",
                    "vae_model_uri=runs:/abc/model"]
    assert "--config" not in _run.train_argv("vae", "/d", "/s", "", [], 1, False, "")


def test_train_argv_matches_the_training_config():
    """Every key the pipeline sets exists in TrainConfig (unknown keys would be rejected)."""
    train_config = pytest.importorskip("mar3d.train.config")
    argv = _run.train_argv("hr", "/d", "/s", "", [], 2, False, "http://m", vae_model_uri="runs:/x/model",
                           feature_cache="/s/lr/feature_cache")
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = train_config.load_train_config("hr", None, overrides)
    assert (cfg.data, cfg.storage_path, cfg.run_name, cfg.num_workers, cfg.use_gpu,
            cfg.mlflow_uri, cfg.vae_model_uri, cfg.feature_cache) == (
        "/d", "/s", "hr", 2, False, "http://m", "runs:/x/model", "/s/lr/feature_cache")


def test_bad_overrides_and_commands_are_rejected():
    with pytest.raises(ValueError, match="key.sub=value"):
        _run.override_flags(["no_equals_sign"])
    with pytest.raises(ValueError, match="start with 'mar3d'"):
        _run.run_step(["python", "-c", "pass"], None)
    with pytest.raises(ValueError, match="--result-json"):
        _run.run_step(["mar3d", "evaluate", "--result-json", "x"], None)


def test_result_is_read_from_the_ray_job_log():
    logs = ("starting\n" + _run.RESULT_MARKER + '{"num_rows": 1}\n'
            + _run.RESULT_MARKER + '{"num_rows": 4, "manifest_path": "/d/manifest.json"}\nbye\n')
    assert _run.parse_result_from_logs(logs) == {"num_rows": 4, "manifest_path": "/d/manifest.json"}
    with pytest.raises(_run.StepFailed, match="no result line"):
        _run.parse_result_from_logs("Traceback ...\n")
    entry = _run.ray_entrypoint(["mar3d", "train", "vae", "--set", "data=/a b"])
    assert entry == "python -m components._run -- mar3d train vae --set 'data=/a b'"


def test_a_failing_command_fails_the_step_in_process():
    """The real CLI, run in-process: an invalid stage exits non-zero -> StepFailed."""
    pytest.importorskip("mar3d.cli")
    with pytest.raises(_run.StepFailed, match="exited with status 2"):
        _run.run_step(["mar3d", "train", "no-such-stage"], None)


def test_ray_job_entrypoint_exits_nonzero_on_failure():
    """What a Ray job runs: a failing step must end the driver with an error status so the
    Ray job is FAILED and run_step raises with its message."""
    pytest.importorskip("mar3d.cli")
    proc = subprocess.run([sys.executable, "-m", "components._run", "--", "mar3d", "train", "no-such-stage"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "mar3d step failed: `mar3d train no-such-stage` exited with status 2" in proc.stderr
    assert "Traceback" not in proc.stderr  # one line for the job's log tail, not a stack
    assert _run.RESULT_MARKER not in proc.stdout


def test_pointer_artifacts_round_trip(tmp_path):
    from kfp.dsl import Model

    out = Model(name="model", uri=str(tmp_path / "model"), metadata={})
    out.path = str(tmp_path / "model")
    _run.write_pointer(out, {"run_id": "r1", "model_uri": "runs:/r1/model", "metrics": {"loss": 0.5}},
                       "/w/j/train/vae")
    assert out.metadata == {"location": "/w/j/train/vae", "run_id": "r1", "model_uri": "runs:/r1/model"}
    back = Model(name="model", uri=out.uri, metadata={})
    back.path = out.path
    assert _run.read_pointer(back) == {"location": "/w/j/train/vae", "run_id": "r1",
                                       "model_uri": "runs:/r1/model", "metrics": {"loss": 0.5}}
    missing = Model(name="m", uri=str(tmp_path / "nope"), metadata={})
    missing.path = str(tmp_path / "nope")
    with pytest.raises(_run.StepFailed, match="no pointer file"):
        _run.read_pointer(missing)


def test_presets_scale_training_and_keep_the_same_models():
    from pipelines.presets import pipeline_preset
    from mar3d.train import load_train_config

    tiny, small, smoke = (pipeline_preset(p) for p in ("tiny", "small", "smoke"))
    factor = yaml.safe_load((PIPELINE_PRESET_DIR / "small.yaml").read_text())["train_length_factor"]
    assert factor == 3.5
    assert {k: v for k, v in small.items() if not k.endswith("_overrides")} == \
        {k: v for k, v in tiny.items() if not k.endswith("_overrides")}
    for stage in ("vae", "lr", "hr"):
        vae = [] if stage == "vae" else ["vae_model_uri=/path/to/vae"]  # required, unused here
        base = load_train_config(stage, tiny[f"{stage}_config"], vae)
        longer = load_train_config(stage, small[f"{stage}_config"], [*small[f"{stage}_overrides"], *vae])
        assert longer.steps == round(base.steps * factor)
        assert longer.warmup_steps == round(base.warmup_steps * factor)
        # Same models: only the training length differs.
        assert longer.vae == base.vae and (stage == "vae" or longer.mar == base.mar)
        assert "batch_size=1" in smoke[f"{stage}_overrides"]
    with pytest.raises(ConfigError, match="unknown pipeline preset 'huge'"):
        pipeline_preset("huge")


def test_pipeline_presets_are_the_one_place_for_sizes_gate_and_workers(ir, tmp_path, monkeypatch):
    """Every preset sets every parameter (alone or through its base); the Kubeflow
    pipeline's defaults are the paper preset's; a file with an unknown key or a base
    cycle is refused, naming the key."""
    from pipelines import presets

    assert presets.pipeline_presets() == ["paper", "small", "smoke", "tiny"]
    for name in presets.pipeline_presets():
        args = presets.pipeline_preset(name)
        assert set(args) == set(presets.PARAMETERS), name
        for step in presets.STEPS:
            if args[f"{step}_config"]:
                assert config_path(args[f"{step}_config"]).is_file()
    paper = presets.pipeline_preset("paper")
    spec = ir["root"]["inputDefinitions"]["parameters"]
    for key, value in paper.items():
        assert spec[key]["defaultValue"] == value, key
    assert (paper["num_workers"], paper["use_gpu"], paper["gate_max_chamfer"]) == (8, True, 0.05)

    import mar3d.config

    monkeypatch.setattr(mar3d.config, "PIPELINE_PRESET_DIR", tmp_path)
    (tmp_path / "typo.yaml").write_text("base: typo2\nnum_worker: 3\n")
    (tmp_path / "a.yaml").write_text("base: b\n")
    (tmp_path / "b.yaml").write_text("base: a\n")
    with pytest.raises(ConfigError, match=r"unknown keys \['num_worker'\]"):
        presets.pipeline_preset("typo")
    with pytest.raises(ConfigError, match="its own base"):
        presets.pipeline_preset("a")
    (tmp_path / "partial.yaml").write_text("data_config: data\n")
    with pytest.raises(ConfigError, match="does not set"):
        presets.pipeline_preset("partial")
    # A quoted "false" is not a bool and a bool is not a worker count: refused, not coerced.
    paper = (PIPELINE_PRESET_DIR / "paper.yaml").read_text()
    (tmp_path / "quoted.yaml").write_text(paper.replace("use_gpu: true", 'use_gpu: "false"'))
    with pytest.raises(ConfigError, match="use_gpu must be of type bool, got 'false'"):
        presets.pipeline_preset("quoted")
    (tmp_path / "flag.yaml").write_text(paper.replace("num_workers: 8", "num_workers: true"))
    with pytest.raises(ConfigError, match="num_workers must be of type int, got True"):
        presets.pipeline_preset("flag")


@pytest.fixture
def local_runs(monkeypatch) -> list[dict]:
    """The keyword arguments of every `run_local` call the command line makes (none runs)."""
    from pipelines import orchestrate

    seen = []

    class Done:
        def summary(self):
            return "done"

        def to_dict(self):
            return {}

    monkeypatch.setattr(orchestrate, "run_local", lambda *a, **kw: seen.append(kw) or Done())
    return seen


def test_smoke_preset_turns_the_baseline_floor_off_and_flags_win(local_runs, tmp_path):
    """smoke is a plumbing check (4 objects and a few steps): promoted without the gate's
    mean-shape floor; tiny and small keep it on. A flag given on the command line wins
    over the preset; a flag not given leaves the preset's value."""
    from pipelines import cli
    from pipelines.presets import pipeline_preset
    from mar3d.config import load_config
    from mar3d.registry import PromoteConfig

    assert pipeline_preset("smoke")["gate_beat_baseline"] is False
    assert pipeline_preset("tiny")["gate_beat_baseline"] is True
    assert pipeline_preset("small")["gate_beat_baseline"] is True
    # What the promote component passes for either value loads as PromoteConfig.
    for value, expected in (("false", False), ("true", True)):
        assert load_config(PromoteConfig, None, [f"gate.beat_baseline={value}"]).gate.beat_baseline is expected

    base = ["pipeline", "run", "--local", "--dataset", str(tmp_path), "--workdir", str(tmp_path / "w")]
    for flags, expected in (([], None), (["--no-gate-baseline"], False),
                            (["--preset", "smoke", "--gate-baseline"], True)):
        assert cli.main([*base, *flags]) == 0
        assert local_runs[-1]["gate_beat_baseline"] is expected, flags


def test_run_args_set_pipeline_parameters_over_the_preset_and_bad_ones_are_refused(local_runs, tmp_path, capsys):
    """`pipeline run --arg NAME=VALUE` (as `pipeline submit --arg`): JSON values, checked
    against the preset parameters' names and types before anything runs."""
    from pipelines import cli

    base = ["pipeline", "run", "--local", "--dataset", str(tmp_path), "--workdir", str(tmp_path / "w")]
    assert cli.main([*base, "--arg", 'vae_overrides=["steps=3", "batch_size=1"]', "--arg", "num_workers=1",
                     "--feature-cache"]) == 0
    assert local_runs[-1]["extra"] == {"vae_overrides": ["steps=3", "batch_size=1"], "num_workers": 1,
                                       "feature_cache": True}
    for arg, message in (("no_such=1", "unknown pipeline argument 'no_such'"),
                         ("num_workers=two", "num_workers must be of type int"),
                         ("vae_overrides=steps=3", "vae_overrides must be a list of 'key=value' strings (JSON)")):
        assert cli.main([*base, "--arg", arg]) == 2
        assert message in capsys.readouterr().err
    assert len(local_runs) == 1


def test_a_local_gpu_preset_is_refused_without_the_gpus_before_any_step(monkeypatch, tmp_path):
    """The paper preset trains on 8 GPU workers: run locally on a machine with fewer GPUs
    it is refused at once, with what to do, instead of waiting for GPUs forever."""
    import torch

    from pipelines import orchestrate

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match=r"preset 'paper' trains on 8 GPU worker\(s\) .* has 0 CUDA GPU"):
        orchestrate.run_local(tmp_path, tmp_path / "work", preset="paper")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="choose --num-workers 2"):
        orchestrate.run_local(tmp_path, tmp_path / "work", preset="paper")
    assert not (tmp_path / "work" / "runs").exists()  # nothing started
