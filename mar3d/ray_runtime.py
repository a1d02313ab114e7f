"""Connecting the driver of a Ray Data job to Ray, one way for every job."""
from __future__ import annotations


def ensure_ray() -> None:
    """Join ``RAY_ADDRESS`` (a cluster) if set, else start a local instance — unless this
    process is already connected. Worker threads are capped because each Ray task or
    actor already has its own CPU share; oversubscribed BLAS threads made jobs slower."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, ignore_reinit_error=True, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
