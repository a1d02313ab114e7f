"""evaluate: score the trained cascade on held-out views and objects via `mar3d evaluate`.

Models are passed as the ``model_uri`` each training stage reported (``runs:/...``).
The current champion of ``model_name`` (if any) is scored on the same objects, so the
promotion gate compares like with like. The report (``report_path``, a JSON file in the
step folder) is what promote attaches to the registered release."""
from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components import MAR3D_IMAGE


@dsl.component(base_image=MAR3D_IMAGE, packages_to_install=[], install_kfp_package=False)
def evaluate(dataset: Input[Dataset], vae_model: Input[Model], lr_model: Input[Model],
             hr_model: Input[Model], workdir: str, job_id: str,
             resume_run_id: str, config: str,
             overrides: list, model_name: str, mlflow_tracking_uri: str, ray_address: str,
             metrics: Output[Metrics], report: Output[Artifact]):
    """Per group (seen objects / held-out view, held-out objects): Chamfer, F-score,
    normal consistency, IoU, retrieval and diversity of the cascade, next to a mean-shape
    baseline and the current champion."""
    from components._run import (optional_flag, override_flags, read_pointer, run_step,
                                 step_dir, step_failed, write_pointer)

    out = step_dir(workdir, resume_run_id or job_id, "eval")
    argv = (["mar3d", "evaluate", "--data", read_pointer(dataset)["location"],
             "--vae-model", read_pointer(vae_model)["model_uri"],
             "--lr-model", read_pointer(lr_model)["model_uri"],
             "--hr-model", read_pointer(hr_model)["model_uri"],
             "--output", out, "--compare-to-champion", model_name]
            + optional_flag("--config", config) + override_flags(overrides)
            + optional_flag("--tracking-uri", mlflow_tracking_uri))
    result = run_step(argv, ray_address, log_dir=out)
    scores = result.get("metrics")
    if not isinstance(scores, dict) or not scores:
        raise step_failed(argv, f"`mar3d evaluate` returned no metrics: {result}")
    for name, value in scores.items():
        metrics.log_metric(name, float(value))
    write_pointer(report, result, out)
