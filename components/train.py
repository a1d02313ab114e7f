"""train_vae / train_lr / train_hr: the three training stages via `mar3d train <stage>`.

Each stage reads the prepared shards, trains with Ray Train (+ DeepSpeed) on the cluster
or a local Ray, logs to MLflow and outputs a pointer to its exported model
(``model_uri``: ``runs:/<run>/model``) and checkpoint. MAR-LR and MAR-HR both learn on
latents of the frozen VAE, so both take the VAE model; HR is trained with ground-truth
(augmented) LR latents and so needs no LR weights, but it takes the frozen image encoder
LR was trained with (``condition_model_uri`` of LR's result), so that a release stores
and runs one encoder. With ``feature_cache`` LR builds the feature/latent cache into
its run folder before training (``feature_cache=build``) and HR trains from the same
cache (``feature_cache`` of LR's result)."""
from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import MAR3D_IMAGE


@dsl.component(base_image=MAR3D_IMAGE, packages_to_install=[], install_kfp_package=False)
def train_vae(dataset: Input[Dataset], workdir: str, job_id: str, resume_run_id: str,
              config: str,
              overrides: list, num_workers: int, use_gpu: bool, mlflow_tracking_uri: str,
              ray_address: str, model: Output[Model]):
    """Train the Pyramid VAE."""
    from components._run import train_argv, read_pointer, run_step, step_dir, write_pointer

    storage = step_dir(workdir, resume_run_id or job_id, "train")
    argv = train_argv("vae", read_pointer(dataset)["location"], storage, config, overrides,
                      num_workers, use_gpu, mlflow_tracking_uri)
    write_pointer(model, run_step(argv, ray_address, log_dir=f"{storage}/vae"), f"{storage}/vae")


@dsl.component(base_image=MAR3D_IMAGE, packages_to_install=[], install_kfp_package=False)
def train_lr(dataset: Input[Dataset], vae_model: Input[Model], workdir: str, job_id: str,
             resume_run_id: str,
             config: str, overrides: list, num_workers: int, use_gpu: bool,
             mlflow_tracking_uri: str, ray_address: str, feature_cache: bool, model: Output[Model]):
    """Train MAR-LR (image -> LR latent tokens of the frozen VAE); with ``feature_cache``
    from a feature/latent cache it builds first."""
    from components._run import train_argv, read_pointer, run_step, step_dir, write_pointer

    storage = step_dir(workdir, resume_run_id or job_id, "train")
    argv = train_argv("lr", read_pointer(dataset)["location"], storage, config, overrides,
                      num_workers, use_gpu, mlflow_tracking_uri,
                      vae_model_uri=read_pointer(vae_model)["model_uri"],
                      feature_cache="build" if feature_cache else "")
    write_pointer(model, run_step(argv, ray_address, log_dir=f"{storage}/lr"), f"{storage}/lr")


@dsl.component(base_image=MAR3D_IMAGE, packages_to_install=[], install_kfp_package=False)
def train_hr(dataset: Input[Dataset], vae_model: Input[Model], lr_model: Input[Model], workdir: str,
             job_id: str, resume_run_id: str,
             config: str, overrides: list, num_workers: int, use_gpu: bool,
             mlflow_tracking_uri: str, ray_address: str, model: Output[Model]):
    """Train MAR-HR (image + LR latents -> HR latent tokens of the frozen VAE)."""
    from components._run import train_argv, read_pointer, run_step, step_dir, write_pointer

    storage = step_dir(workdir, resume_run_id or job_id, "train")
    argv = train_argv("hr", read_pointer(dataset)["location"], storage, config, overrides,
                      num_workers, use_gpu, mlflow_tracking_uri,
                      vae_model_uri=read_pointer(vae_model)["model_uri"],
                      condition_model_uri=read_pointer(lr_model)["condition_model_uri"],
                      feature_cache=read_pointer(lr_model).get("feature_cache", ""))
    write_pointer(model, run_step(argv, ray_address, log_dir=f"{storage}/hr"), f"{storage}/hr")
