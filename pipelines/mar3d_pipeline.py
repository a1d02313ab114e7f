"""The MAR-3D training-to-serving pipeline (kfp v2):

    prepare -> train_vae -> train_lr -> train_hr -> evaluate -> promote -> batch_generate

Each task is a thin component from ``components/`` that runs one `mar3d` CLI command,
either in-process (``ray_address`` empty: laptop / ``kfp.local``) or as a Ray job on a
RayCluster (``ray_address = http://<head-svc>:8265``). Steps hand each other small pointer
artifacts (Dataset, Model, Metrics); the data itself lives under ``workdir/<job id>/``,
which must be storage every step can reach (a local folder, an RWX volume, or S3).

Compile:  python -m pipelines.mar3d_pipeline [out.yaml]   (default: pipelines/mar3d_pipeline.yaml)
"""
# No `from __future__ import annotations`: kfp reads the parameter annotations as types.

import sys
from pathlib import Path

from kfp import compiler, dsl, kubernetes

from components.evaluate import evaluate
from components.generate import batch_generate
from components.prepare import prepare
from components.promote import promote
from components.train import train_hr, train_lr, train_vae
from pipelines.presets import DEFAULT_PRESET, pipeline_preset

COMPILED = Path(__file__).with_name("mar3d_pipeline.yaml")
# On Kubeflow every step pod reads its credentials from Secrets (created out of band,
# k8s/README.md) as the standard variables, never from a pipeline parameter: the Ray
# cluster's auth token (sent by the Jobs API client, mar3d.cluster.auth_headers) and the
# pipeline's MLflow account. kfp's local runner ignores these.
STEP_SECRETS = {"mar3d-ray-auth": {"auth_token": "RAY_AUTH_TOKEN"},
                "mar3d-mlflow-pipeline": {"username": "MLFLOW_TRACKING_USERNAME",
                                          "password": "MLFLOW_TRACKING_PASSWORD"}}
# The parameters' defaults are a pipeline preset's (a Kubeflow user who sets nothing runs
# the paper's models on GPUs); `mar3d pipeline run/submit --preset` pass another one.
DEFAULTS = pipeline_preset(DEFAULT_PRESET)


@dsl.pipeline(name="mar3d", description="MAR-3D: prepare, train VAE/MAR-LR/MAR-HR, "
                                         "evaluate, gate+promote in MLflow, batch-generate.")
def mar3d_pipeline(
    dataset_uri: str,
    workdir: str,
    data_config: str = DEFAULTS["data_config"],
    vae_config: str = DEFAULTS["vae_config"],
    lr_config: str = DEFAULTS["lr_config"],
    hr_config: str = DEFAULTS["hr_config"],
    eval_config: str = DEFAULTS["eval_config"],
    generate_config: str = DEFAULTS["generate_config"],
    data_overrides: list = DEFAULTS["data_overrides"],
    vae_overrides: list = DEFAULTS["vae_overrides"],
    lr_overrides: list = DEFAULTS["lr_overrides"],
    hr_overrides: list = DEFAULTS["hr_overrides"],
    eval_overrides: list = DEFAULTS["eval_overrides"],
    generate_overrides: list = DEFAULTS["generate_overrides"],
    num_workers: int = DEFAULTS["num_workers"],
    use_gpu: bool = DEFAULTS["use_gpu"],
    mlflow_tracking_uri: str = "",
    model_name: str = "mar3d",
    gate_max_chamfer: float = DEFAULTS["gate_max_chamfer"],
    gate_min_fscore: float = DEFAULTS["gate_min_fscore"],
    gate_beat_baseline: bool = DEFAULTS["gate_beat_baseline"],
    generate_input: str = "",
    ray_address: str = "",
    resume_run_id: str = "",
    feature_cache: bool = False,
):
    # Outputs of one run go under <workdir>/<pipeline job id>/<step>; with resume_run_id
    # (the job id of an earlier, failed run) under that run's folders instead, so every
    # step continues it: data skips complete shards, training resumes from checkpoints.
    run = {"job_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER, "resume_run_id": resume_run_id}

    prepare_task = prepare(dataset_uri=dataset_uri, workdir=workdir, **run,
                           data_config=data_config, overrides=data_overrides,
                           ray_address=ray_address)
    shards = prepare_task.outputs["dataset"]
    vae_task = train_vae(dataset=shards, workdir=workdir, **run, config=vae_config,
                         overrides=vae_overrides, num_workers=num_workers, use_gpu=use_gpu,
                         mlflow_tracking_uri=mlflow_tracking_uri, ray_address=ray_address)
    vae_model = vae_task.outputs["model"]
    lr_task = train_lr(dataset=shards, vae_model=vae_model, workdir=workdir, **run,
                       config=lr_config, overrides=lr_overrides, num_workers=num_workers,
                       use_gpu=use_gpu, mlflow_tracking_uri=mlflow_tracking_uri,
                       ray_address=ray_address, feature_cache=feature_cache)
    lr_model = lr_task.outputs["model"]
    # HR learns from (augmented) ground-truth LR latents, so it needs no LR weights; it
    # takes LR's frozen image encoder (one per release) and so runs after LR, which also
    # gives the GPU pool to one stage at a time, in the paper's order. With feature_cache
    # LR builds the feature/latent cache (a Ray Data job) and HR trains from the same one.
    hr_task = train_hr(dataset=shards, vae_model=vae_model, lr_model=lr_model, workdir=workdir,
                       **run, config=hr_config, overrides=hr_overrides, num_workers=num_workers,
                       use_gpu=use_gpu, mlflow_tracking_uri=mlflow_tracking_uri,
                       ray_address=ray_address)
    hr_model = hr_task.outputs["model"]
    eval_task = evaluate(dataset=shards, vae_model=vae_model, lr_model=lr_model,
                         hr_model=hr_model, workdir=workdir, **run, config=eval_config,
                         overrides=eval_overrides, model_name=model_name,
                         mlflow_tracking_uri=mlflow_tracking_uri, ray_address=ray_address)
    promote_task = promote(vae_model=vae_model, lr_model=lr_model, hr_model=hr_model,
                           report=eval_task.outputs["report"],
                           model_name=model_name, gate_max_chamfer=gate_max_chamfer,
                           gate_min_fscore=gate_min_fscore, gate_beat_baseline=gate_beat_baseline,
                           mlflow_tracking_uri=mlflow_tracking_uri, ray_address=ray_address,
                           workdir=workdir, **run)
    # Registering a model version is a side effect: never answer it from kfp's cache.
    promote_task.set_caching_options(False)
    generate_task = batch_generate(release=promote_task.outputs["release"],
                                   dataset=shards, generate_input=generate_input,
                                   workdir=workdir, **run, config=generate_config,
                                   overrides=generate_overrides,
                                   mlflow_tracking_uri=mlflow_tracking_uri,
                                   ray_address=ray_address)

    # On a cluster every step only submits a Ray job and polls it, so its own pod is small;
    # the heavy work runs in the RayCluster's GPU worker groups (k8s/).
    for task in (prepare_task, vae_task, lr_task, hr_task, eval_task, promote_task,
                 generate_task):
        task.set_cpu_request("250m").set_cpu_limit("1")
        task.set_memory_request("512M").set_memory_limit("2G")
        for secret, keys in STEP_SECRETS.items():
            kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env=keys)


def compile_pipeline(path: str | Path = COMPILED) -> Path:
    """Compile :func:`mar3d_pipeline` to kfp IR YAML at ``path`` and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_func=mar3d_pipeline, package_path=str(path))
    return path


if __name__ == "__main__":
    print(compile_pipeline(sys.argv[1] if len(sys.argv) > 1 else COMPILED))
