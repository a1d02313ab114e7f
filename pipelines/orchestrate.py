"""Run the Kubeflow pipeline: compile it, run it locally with kfp's local runner, or
submit it to a Kubeflow Pipelines endpoint; submit single stages to a Ray cluster.

``run_local`` executes *the same* pipeline as a cluster does (``pipelines/``), with
``kfp.local.SubprocessRunner(use_venv=False)``: every component runs as a subprocess of
this Python environment, the heavy steps start a local Ray, and MLflow is a SQLite file
in the work folder unless ``mlflow_uri`` names a server.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.presets import pipeline_preset

log = logging.getLogger(__name__)


@dataclass
class LocalRunResult:
    workdir: Path
    mlflow_uri: str
    seconds: float
    meshes: list[Path]
    results_path: Path | None
    contact_sheets: list[Path] = field(default_factory=list)  # evaluation groups, then generation
    pages: list[Path] = field(default_factory=list)           # 3D pages: evaluation groups, gallery
    evaluation: str = ""                                       # the evaluation's side-by-side table
    run_id: str = ""                                           # its folder under workdir/runs

    def summary(self) -> str:
        lines = [f"pipeline run {self.run_id} finished in {self.seconds / 60:.1f} min",
                 f"  work folder: {self.workdir}",
                 f"  meshes:      {len(self.meshes)} files"
                 + (f" under {self.meshes[0].parent}" if self.meshes else ""),
                 f"  results:     {self.results_path}",
                 f"  MLflow:      {self.mlflow_uri}"]
        if self.run_id:
            lines.append(f"  step logs:   {self.workdir / 'runs' / self.run_id}/<step>/step.log")
        lines += [f"  contact sheet: {p}" for p in self.contact_sheets]
        lines += [f"  3D page:       {p}" for p in self.pages]
        if self.mlflow_uri.startswith("sqlite:///"):
            lines.append(f"  browse runs and registered models: mlflow ui --backend-store-uri {self.mlflow_uri}")
        if self.evaluation:
            lines += ["", self.evaluation]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"workdir": str(self.workdir), "mlflow_uri": self.mlflow_uri, "run_id": self.run_id,
                "seconds": round(self.seconds, 1), "num_meshes": len(self.meshes),
                "results_path": str(self.results_path) if self.results_path else None,
                "contact_sheets": [str(p) for p in self.contact_sheets],
                "pages": [str(p) for p in self.pages]}


def compile_pipeline(path: str | Path | None = None) -> Path:
    from pipelines.mar3d_pipeline import COMPILED, compile_pipeline as _compile

    return _compile(path or COMPILED)


def run_local(dataset: str | Path, workdir: str | Path, mlflow_uri: str | None = None,
              preset: str = "tiny", model_name: str = "mar3d", gate_max_chamfer: float | None = None,
              gate_min_fscore: float | None = None, gate_beat_baseline: bool | None = None,
              num_workers: int | None = None, extra: dict | None = None, ray_address: str = "",
              resume: str = "", verbose: bool = False) -> LocalRunResult:
    """Run the whole pipeline with kfp's local runner and return where its outputs are.

    ``preset``: a pipeline preset (:mod:`pipelines.presets`); the gate's bounds,
    ``gate_beat_baseline`` (promotion requires beating the mean-shape baseline) and
    ``num_workers`` are the preset's unless given; ``extra`` sets any other pipeline
    parameter.

    ``ray_address`` empty: every step runs here (local Ray for the heavy ones). Set to a
    Ray cluster's Jobs API (``http://HOST:8265``): kfp still orchestrates from here, and
    every step is submitted to that cluster as a Ray job (the "run on a cluster without
    Kubeflow" path); ``workdir`` and the dataset must then be reachable from the cluster's
    nodes under the same path (or be object storage).

    ``resume``: the run id of an earlier run in this ``workdir`` (printed when it failed):
    every step works in that run's folders again, so finished data shards are skipped and
    training continues from its checkpoints.

    Prints a line as each step starts and ends and one progress bar per long step; each
    step's full log is ``step.log`` in its folder, kfp's own output is in
    ``workdir/logs/``. ``verbose``: everything, as kfp relays it."""
    import kfp.local

    from components._run import FAILURES_ENV
    from mar3d.logs import pipeline_output
    from pipelines.mar3d_pipeline import mar3d_pipeline

    dataset = Path(dataset).resolve()
    if not dataset.exists():
        raise FileNotFoundError(f"dataset {dataset} does not exist")
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    mlflow_uri = mlflow_uri or f"sqlite:///{workdir / 'mlflow.db'}"
    args = pipeline_preset(preset)
    explicit = {"gate_max_chamfer": gate_max_chamfer, "gate_min_fscore": gate_min_fscore,
                "gate_beat_baseline": gate_beat_baseline, "num_workers": num_workers}
    args.update({k: v for k, v in explicit.items() if v is not None})
    args.update(extra or {})
    if ray_address:
        _check_jobs_api(ray_address)
    else:
        _check_local_gpus(preset, args)
    runs = workdir / "runs"
    if resume and not (runs / resume).is_dir():
        known = sorted(p.name for p in runs.iterdir()) if runs.is_dir() else []
        raise FileNotFoundError(f"no run {resume!r} to resume under {runs}; runs there: {known or 'none'}")
    before = set(runs.iterdir()) if runs.is_dir() else set()
    # Components are subprocesses: they find MLflow and the thread budget through the env.
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri
    stamp = time.strftime("%Y%m%d-%H%M%S")
    failures = workdir / "failures" / stamp
    os.environ[FAILURES_ENV] = str(failures)
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False),
                   pipeline_root=str(workdir / "kfp"), raise_on_error=True)
    launcher_log = workdir / "logs" / f"{stamp}-pipeline.log"
    start = time.perf_counter()
    try:
        with pipeline_output(launcher_log, verbose):
            mar3d_pipeline(dataset_uri=str(dataset), workdir=str(runs),
                           mlflow_tracking_uri=mlflow_uri, model_name=model_name,
                           ray_address=ray_address, resume_run_id=resume, **args)
    except RuntimeError as exc:
        raise _pipeline_failure(exc, failures, resume or _new_run_id(runs, before),
                                launcher_log) from None
    run_id = resume or _new_run_id(runs, before)
    return _local_result(workdir, mlflow_uri, time.perf_counter() - start, run_id)


def _local_result(workdir: Path, mlflow_uri: str, seconds: float, run_id: str) -> LocalRunResult:
    """Where a finished local run's meshes, contact sheets, 3D pages and evaluation table are."""
    latest = workdir / "runs" / run_id / "generate" / "results.parquet" if run_id else None
    latest = latest if latest is not None and latest.is_file() else None
    meshes = sorted(latest.parent.rglob("*.glb")) if latest else []
    sheets, pages, table = [], [], ""
    if latest is not None:
        from mar3d.evaluate import evaluation_table
        from mar3d.evaluate.config import SHEET_DIR, VIEW_DIR
        from mar3d.generate import CONTACT_SHEET, GALLERY

        run = latest.parent.parent
        sheets = sorted((run / "eval" / SHEET_DIR).glob("*.png"))
        sheets += [p for p in [latest.parent / CONTACT_SHEET] if p.is_file()]
        pages = sorted((run / "eval" / VIEW_DIR).glob("*.html"))
        pages += [p for p in [latest.parent / GALLERY] if p.is_file()]
        report = run / "eval" / "report.json"
        if report.is_file():
            table = evaluation_table(json.loads(report.read_text())["metrics"])
    return LocalRunResult(workdir, mlflow_uri, seconds, meshes, latest, contact_sheets=sheets, pages=pages,
                          evaluation=table, run_id=run_id)


def _new_run_id(runs: Path, before: set[Path]) -> str:
    """The run folder this pipeline run created (its kfp job id), "" if none yet."""
    new = [p for p in runs.iterdir() if p not in before] if runs.is_dir() else []
    return max(new, key=lambda p: p.stat().st_mtime).name if new else ""


def _pipeline_failure(exc: RuntimeError, failures: Path, run_id: str,
                      launcher_log: Path) -> Exception:
    """kfp's "Inner task failed: 'x'" plus the failed step's own message (when it left
    one, with where its full log is) and how to resume the run."""
    from components._run import StepFailed

    message = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    recorded = sorted(failures.glob("*.txt")) if failures.is_dir() else []
    if recorded:
        message += "\n" + recorded[-1].read_text()
    elif launcher_log.is_file():
        message += f"\nthe step left no message; kfp's output: {launcher_log}"
    if run_id:
        message += (f"\nrun id {run_id}: after fixing the cause, continue it with the same "
                    f"command plus --resume {run_id}")
    return StepFailed(message)


def _check_local_gpus(preset: str, args: dict) -> None:
    """Fail before any step starts when the run trains on GPUs that this machine does not
    have (Ray Train would otherwise wait for them forever)."""
    if not args.get("use_gpu"):
        return
    import torch

    wanted, have = int(args["num_workers"]), torch.cuda.device_count()
    if wanted > have:
        raise ValueError(
            f"preset {preset!r} trains on {wanted} GPU worker(s) (use_gpu: true) but this machine "
            f"has {have} CUDA GPU(s): choose --num-workers {have} (if above 0), a CPU preset "
            "(--preset tiny, small or smoke), or run on a GPU cluster (--ray-address URL, or "
            "`mar3d pipeline submit` to Kubeflow)")


def _check_jobs_api(address: str) -> None:
    """Fail before any step starts when the cluster's Jobs API cannot be reached (wrong
    address, a head without the dashboard, a missing auth token)."""
    from mar3d.cluster import ClusterError, job_client

    try:
        job_client(address).list_jobs()
    except Exception as exc:  # noqa: BLE001 - Ray raises several types for the same cause
        raise ClusterError(
            f"cannot reach the Ray Jobs API at {address}: {exc}. Check the address "
            "(http://HEAD:8265), that the head runs the dashboard (ray[default] installed), "
            "and for a token-authenticated cluster RAY_AUTH_MODE=token with RAY_AUTH_TOKEN "
            "or RAY_AUTH_TOKEN_PATH (`mar3d cluster up` prints them).") from exc


def submit_pipeline(host: str, arguments: dict, experiment: str = "mar3d",
                    package: str | Path | None = None, namespace: str | None = None) -> str:
    """Submit the compiled pipeline to a Kubeflow Pipelines endpoint; returns the run id."""
    import kfp

    package = Path(package) if package else compile_pipeline()
    client = kfp.Client(host=host, namespace=namespace)
    run = client.create_run_from_pipeline_package(str(package), arguments=arguments,
                                                  experiment_name=experiment)
    return run.run_id


def submit_ray_stage(address: str, argv: list[str]) -> dict:
    """Run one `mar3d ...` stage as a Ray job on ``address`` and wait for its result."""
    from components._run import run_step

    if not argv or argv[0] != "mar3d":
        argv = ["mar3d", *argv]
    log.info("submitting %s to %s", shlex.join(argv), address)
    return run_step(argv, address)


def parse_pipeline_arguments(pairs: list[str]) -> dict:
    """``name=value`` pairs (values as JSON when they parse, else strings)."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"pipeline argument {pair!r} must look like name=value")
        key, raw = pair.split("=", 1)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out
