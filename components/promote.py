"""promote: register the trained cascade as an MLflow release and gate its promotion."""
from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from components import MAR3D_IMAGE


@dsl.component(base_image=MAR3D_IMAGE, packages_to_install=[], install_kfp_package=False)
def promote(vae_model: Input[Model], lr_model: Input[Model], hr_model: Input[Model],
            report: Input[Artifact], model_name: str, gate_max_chamfer: float,
            gate_min_fscore: float, gate_beat_baseline: bool, mlflow_tracking_uri: str,
            ray_address: str, workdir: str, job_id: str, resume_run_id: str,
            release: Output[Model]):
    """Registers VAE/LR/HR as one release, attaches the evaluation metrics and moves the
    champion alias if the gate passes (``gate_beat_baseline``: the release must also beat
    the mean-shape baseline on the gate's metrics). A refusal fails this step, so batch
    generation never runs with a model that did not pass the gate."""
    from components._run import (optional_flag, read_pointer, run_step, step_dir, step_failed,
                                 write_pointer)

    argv = (["mar3d", "promote",
             "--vae-model", read_pointer(vae_model)["model_uri"],
             "--lr-model", read_pointer(lr_model)["model_uri"],
             "--hr-model", read_pointer(hr_model)["model_uri"],
             "--eval-report", read_pointer(report)["report_path"],
             "--set", f"registry.name={model_name}",
             "--set", f"gate.maximums.chamfer={float(gate_max_chamfer)!r}",
             "--set", f"gate.minimums.f_score={float(gate_min_fscore)!r}",
             "--set", f"gate.beat_baseline={'true' if gate_beat_baseline else 'false'}"]
            + optional_flag("--tracking-uri", mlflow_tracking_uri))
    result = run_step(argv, ray_address, log_dir=step_dir(workdir, resume_run_id or job_id, "promote"))
    if not result.get("promoted"):
        raise step_failed(argv, f"release {result.get('release_uri')} not promoted by the gate:\n"
                          f"{result.get('gate', result)}")
    write_pointer(release, result, result["release_uri"])
