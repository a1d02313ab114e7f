"""Where a secret ended up: everything a pipeline run writes, searched for the session's
credentials (the MLflow password, the Ray token, the S3 secret key).

Searched: every file under the given folders (step logs, ``report.json``,
``results.parquet``, kfp's executor inputs, i.e. the steps' arguments, and the MLflow
server's stores and artifacts), every MLflow run's params, tags and metric names through
the API, and every Ray job's entrypoint, metadata, runtime environment and log."""
from __future__ import annotations

from pathlib import Path


def _in_files(values: dict[str, str], folder: Path) -> list[str]:
    folder = Path(folder)
    paths = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    found = []
    for path in paths:
        data = path.read_bytes()
        found += [f"{name} in {path}" for name, value in values.items() if value.encode() in data]
    return found


def _in_mlflow(values: dict[str, str], uri: str) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = []
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id], max_results=5000):
            texts = {"params": repr(run.data.params), "tags": repr(run.data.tags),
                     "metric names": repr(sorted(run.data.metrics))}
            found += [f"{name} in MLflow run {run.info.run_id} {where}" for where, text in texts.items()
                      for name, value in values.items() if value in text]
    return found


def _in_ray_jobs(values: dict[str, str], client) -> list[str]:
    found = []
    for job in client.list_jobs():
        text = repr((job.entrypoint, job.metadata, job.runtime_env, job.message))
        text += client.get_job_logs(job.submission_id)
        found += [f"{name} in Ray job {job.submission_id}" for name, value in values.items() if value in text]
    return found


def leaks(values: dict[str, str], folders=(), mlflow_uri: str | None = None, ray_client=None) -> list[str]:
    """Every place one of ``values`` (name -> secret) appears; [] when none. ``folders``:
    folders or single files."""
    values = {name: value for name, value in values.items() if value}
    assert values and all(len(v) >= 12 for v in values.values()), "search for distinctive values only"
    found = []
    for folder in folders:
        found += _in_files(values, folder)
    if mlflow_uri:
        found += _in_mlflow(values, mlflow_uri)
    if ray_client is not None:
        found += _in_ray_jobs(values, ray_client)
    return found
