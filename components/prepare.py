"""prepare: raw meshes -> Parquet shards (schema v1) via `mar3d data prepare`."""
from kfp import dsl
from kfp.dsl import Dataset, Output

from components import MAR3D_IMAGE


@dsl.component(base_image=MAR3D_IMAGE, packages_to_install=[], install_kfp_package=False)
def prepare(dataset_uri: str, workdir: str, job_id: str, resume_run_id: str,
            data_config: str, overrides: list, ray_address: str, dataset: Output[Dataset]):
    """Convert the meshes under ``dataset_uri`` into training shards."""
    from components._run import (optional_flag, override_flags, run_step, step_dir, step_failed,
                                 write_pointer)

    out = step_dir(workdir, resume_run_id or job_id, "data")
    argv = (["mar3d", "data", "prepare", "--input", dataset_uri, "--output", out]
            + optional_flag("--config", data_config) + override_flags(overrides))
    result = run_step(argv, ray_address, log_dir=out)
    if int(result.get("num_rows", 0)) == 0:
        raise step_failed(argv, f"prepare produced no rows from {dataset_uri}: {result}")
    write_pointer(dataset, result, out)
