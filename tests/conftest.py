"""Shared fixtures: one local Ray instance and one real `mlflow server` per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from _services import start_mlflow_server, stop_mlflow_server
from _ycb import YCB, YCB_SMALL

# Tests share 2 cores with Ray workers; oversubscribed BLAS/OpenMP threads made the
# model tests ~10x slower. Benchmarks, not tests, measure speed.
os.environ.setdefault("OMP_NUM_THREADS", "1")



@pytest.fixture(scope="session")
def ycb_root() -> Path:
    if not YCB.is_dir():
        pytest.skip(f"YCB dataset not found at {YCB} (set MAR3D_YCB)")
    return YCB


@pytest.fixture(scope="session")
def ycb_small_dir(tmp_path_factory, ycb_root) -> Path:
    """A directory with a few YCB objects (symlinked), as a small input dataset."""
    root = tmp_path_factory.mktemp("ycb_small")
    for name in YCB_SMALL:
        os.symlink(ycb_root / name, root / name)
    return root


@pytest.fixture(scope="session")
def ycb_small_shards(tmp_path_factory, ycb_small_dir, ray_local) -> Path:
    """The YCB_SMALL objects prepared once per session (tiny data config, 4 rows)."""
    from _shards import make_small_shards

    return make_small_shards(ycb_small_dir, tmp_path_factory.mktemp("small_shards") / "data")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (fractional CPUs let 2 train workers fit)."""
    import ray

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False,
                 log_to_driver=True, ignore_reinit_error=True,
                 runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a SQLite backend and local artifact store."""
    uri, proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    yield uri
    stop_mlflow_server(proc)
