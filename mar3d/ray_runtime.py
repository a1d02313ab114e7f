"""Connecting a job's driver to Ray, one way for every job."""
from __future__ import annotations


def ensure_ray(log_to_driver: bool = False) -> None:
    """Join ``RAY_ADDRESS`` (a cluster) if set, else start a local instance — unless this
    process is already connected. Worker threads are capped because each Ray task or
    actor already has its own CPU share; oversubscribed BLAS threads made jobs slower.
    ``log_to_driver``: the tasks' and actors' output is printed by this driver (training,
    whose workers report progress); data and generation jobs report through their own
    progress bars and keep their workers' output in Ray's log files."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, ignore_reinit_error=True, log_to_driver=log_to_driver,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
