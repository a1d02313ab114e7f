"""batch_generate: image-to-3D for a batch of condition images with the promoted release."""
from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components import MAR3D_IMAGE


@dsl.component(base_image=MAR3D_IMAGE, packages_to_install=[], install_kfp_package=False)
def batch_generate(release: Input[Model], dataset: Input[Dataset],
                   generate_input: str, workdir: str, job_id: str,
                   resume_run_id: str, config: str,
                   overrides: list, mlflow_tracking_uri: str, ray_address: str,
                   meshes: Output[Artifact]):
    """Generates from ``generate_input`` (images or a prepared dataset root); empty means
    the condition renders of the prepared dataset."""
    from components._run import (optional_flag, override_flags, read_pointer, run_step,
                                 step_dir, write_pointer)

    out = step_dir(workdir, resume_run_id or job_id, "generate")
    source = generate_input or read_pointer(dataset)["location"]
    argv = (["mar3d", "generate", "--model-uri", read_pointer(release)["release_uri"],
             "--input", source, "--output", out]
            + optional_flag("--config", config) + override_flags(overrides)
            + optional_flag("--tracking-uri", mlflow_tracking_uri))
    write_pointer(meshes, run_step(argv, ray_address, log_dir=out), out)
